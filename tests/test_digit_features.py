"""The digits feature network shipped with the embedded model: a classifier trained on the same coloured digits
(scripts/train_digit_features.py), whose penultimate layer's direction scores the embedded model's samples."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from guidekit.app.digits import DigitClassifier, coloured_digits
from guidekit.evaluation.digit_features import DIM, WEIGHTS, DigitFeatures
from guidekit.evaluation.features import file_sha256, load_feature_network
from guidekit.evaluation.frechet import frechet_distance, gaussian_statistics
from guidekit.evaluation.manifold import precision_recall


@pytest.fixture(scope="module")
def network() -> DigitFeatures:
    return load_feature_network("digits")  # type: ignore[return-value]


def _fd(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*gaussian_statistics(a.numpy()), *gaussian_statistics(b.numpy()))


def test_the_classifier_reads_the_digit_better_than_the_model_cards_baseline(network: DigitFeatures) -> None:
    """On three fresh colourings of the held-out split the shipped classifier's head beats the model card's
    logistic regression (shape features, three training colourings) measured on the same images."""
    generator = torch.Generator().manual_seed(7)
    batches = [coloured_digits("test", generator) for _ in range(3)]
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    out = network(images)
    assert out.features.shape == (len(images), DIM) and out.logits is not None
    accuracy = float((out.logits.argmax(1) == labels).float().mean())
    assert accuracy >= 0.95 and accuracy > DigitClassifier().accuracy(images, labels)
    identity = network.identity()
    assert identity["weights_sha256"] == file_sha256(WEIGHTS) and identity["dim"] == DIM


def test_the_feature_is_the_hidden_layers_direction(network: DigitFeatures) -> None:
    """Computed here from the classifier's own layers: the features are the hidden layer before its ReLU scaled to
    length sqrt(64), the logits the head on that layer's ReLU; the raw ReLU output differs from the features."""
    images = coloured_digits("test", torch.Generator().manual_seed(5))[0][:64]
    out = network(images)
    x = images.float() / 255
    net = network.module
    hidden = net.body[6](net.body[5](net.body[4](net.body[3](net.body[2](net.body[1](net.body[0](x)))))))
    expected = hidden / hidden.norm(dim=1, keepdim=True) * 8.0
    assert torch.allclose(out.features, expected, atol=1e-5)
    assert torch.allclose(out.logits, net.head(torch.clamp(hidden, min=0)), atol=1e-5)
    assert not torch.allclose(out.features, net(x), atol=1e-2)


def test_frechet_distance_separates_real_from_shuffled_and_noise(network: DigitFeatures) -> None:
    """FD of the held-out digits against the training digits (other colours) is small; against the same held-out
    images with their pixels shuffled, or against uniform noise, it is over 20 times larger (both are far from
    every digit direction); precision of the shuffled images against the real ones is lower. Thousands of images
    take seconds."""
    generator = torch.Generator().manual_seed(3)
    train = torch.cat([coloured_digits("train", generator)[0] for _ in range(3)])  # 4311 images
    test = torch.cat([coloured_digits("test", generator)[0] for _ in range(3)])
    order = torch.randperm(64, generator=generator)
    shuffled = test.flatten(2)[:, :, order].reshape(test.shape)
    noise = torch.randint(0, 256, test.shape, generator=generator, dtype=torch.uint8)
    start = time.perf_counter()
    real, held_out = network(train).features, network(test).features
    assert time.perf_counter() - start < 20
    fd_real, fd_shuffled, fd_noise = (_fd(real, f) for f in (held_out, network(shuffled).features,
                                                              network(noise).features))
    assert min(fd_shuffled, fd_noise) > 20 * fd_real
    p_real = precision_recall(real, held_out)[0]
    p_shuffled = precision_recall(real, network(shuffled).features)[0]
    assert p_real > 0.7 and p_shuffled < 0.3


def test_bad_input_is_refused(network: DigitFeatures) -> None:
    with pytest.raises(ValueError, match=r"images of size \(16, 16\) are not accepted .* expected 8 x 8"):
        network(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"^spec='digitz' is not accepted"):
        load_feature_network("digitz")


def test_the_training_script_trains(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_digit_features.py"
    spec = importlib.util.spec_from_file_location("train_digit_features", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    net = module.train(steps=200, batch=64, lr=1e-3, seed=0)
    assert module.held_out_accuracy(net, colourings=1) > 0.5 > np.float64(0.1)
