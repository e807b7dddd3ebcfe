"""The demo's page through its public API (gradio_client), as a second program sees it: comparisons, the testbed,
concurrent clients, and errors that reach the client as messages while the server stays up."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

DEFAULTS = {"model": "default", "scheduler": "pipeline's own", "class_label": 3, "prompt": "", "negative_prompt": "",
            "seed": 0, "steps": 20, "num_images": 4}
METHODS = ["cfg(scale=3)", "apg(scale=3, eta=0)", "pcg(gamma=5)", ""]


def _compare(client: Client, methods: list[str] = METHODS, **changes: object) -> tuple:
    values = {**DEFAULTS, **changes}
    return client.predict(*values.values(), *methods, api_name="/compare")


@pytest.fixture(scope="module")
def client(demo_url: str) -> Client:
    return Client(demo_url, verbose=False)


def test_compare_gives_one_captioned_strip_per_method(client: Client) -> None:
    gallery, table, info = _compare(client, seed=3, class_label=8)
    assert len(gallery) == 3
    for item, method in zip(gallery, METHODS, strict=False):
        image = Image.open(item["image"])  # a file the client downloaded
        assert image.size == (4 * image.size[1], image.size[1])  # four seeds side by side
        assert item["caption"].startswith(method.split("(")[0]) and "model calls" in item["caption"]
    assert table["headers"][:3] == ["method", "sampler", "model calls"]
    assert [row[2] for row in table["data"]] == [20, 20, 39]
    assert "ClassConditionalPipeline" in info


def test_two_concurrent_clients_both_get_their_results(demo_url: str) -> None:
    results: dict[int, tuple] = {}

    def run(seed: int) -> None:
        results[seed] = _compare(Client(demo_url, verbose=False), seed=seed, steps=10)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (10, 20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == [10, 20]
    first, second = (Path(results[s][0][0]["image"]).read_bytes() for s in (10, 20))
    assert len(results[10][0]) == len(results[20][0]) == 3 and first != second


@pytest.mark.parametrize(("changes", "methods", "message"), [
    ({"steps": 0}, METHODS, "steps=0 is not accepted"),
    ({}, ["cfg(scale=-2)", "", "", ""], "scale=-2"),
    ({"model": "/no/such/model"}, METHODS, "model='/no/such/model' could not be loaded"),
    ({"num_images": 2.5}, METHODS, "num_images=2.5"),
    ({"scheduler": "euler"}, METHODS, "scheduler='euler' is not accepted with guidance PCG"),
])
def test_errors_reach_the_client_as_messages_and_the_server_stays_up(client: Client, changes: dict,
                                                                     methods: list[str], message: str) -> None:
    with pytest.raises(AppError, match=message) as caught:
        _compare(client, methods, **changes)
    assert "Traceback" not in str(caught.value) and 'File "' not in str(caught.value)
    gallery, _, _ = _compare(client, ["cfg(scale=2)", "", "", ""], steps=2, num_images=1)
    assert len(gallery) == 1


def test_testbed_tab_gives_a_plot_and_a_table(client: Client) -> None:
    plot, table = client.predict("gaussian", 3, 1, 20, 2000, 0, 2, api_name="/testbed")
    image = Image.open(plot)
    assert image.width > 2 * image.height
    rows = {row[0].split(" (")[0]: row for row in table["data"]}
    assert list(rows) == ["CFG + DDIM", "CFG + DDPM", "PCG", "Autoguidance + DDIM", "target p(x|c)^3 p(x)^-2",
                          "autoguidance target p(x|c)^3 q(x|c)^-2", "exact autoguidance ODE"]
    assert table["headers"][-1] == "W1 to exact ODE"
    assert rows["target p(x|c)^3 p(x)^-2"][1:3] == [1.2, 0.1]  # N(4w / (3w + 1), 1 / (3w + 1)) at w = 3
    # N(1, f^2 / (4 (w f^2 + 1 - w))) at w = 3, f = 2
    assert rows["autoguidance target p(x|c)^3 q(x|c)^-2"][1:3] == [1.0, 0.1]
    assert rows["PCG"][4] == 20 + 19  # model calls: predictor + one corrector step per step but the last
    assert rows["Autoguidance + DDIM"][4] == 2 * 20  # the model and the weak model, once each per step
    assert 0 < rows["Autoguidance + DDIM"][-1] < 0.1  # W1 to the exact ODE
    with pytest.raises(AppError, match="steps=0"):
        client.predict("gaussian", 3, 1, 0, 2000, 0, 2, api_name="/testbed")
    with pytest.raises(AppError, match=r"weak_factor=0\.5 is not accepted"):
        client.predict("gaussian", 3, 1, 20, 2000, 0, 0.5, api_name="/testbed")


def test_every_input_has_a_name_that_says_what_it_is_and_integers_are_typed_int(client: Client) -> None:
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    compare = {p["parameter_name"]: p["type"]["type"] for p in api["/compare"]["parameters"]}
    assert list(compare) == [*DEFAULTS, "method_1", "method_2", "method_3", "method_4"]
    assert {k: compare[k] for k in ("class_label", "seed", "steps", "num_images")} == dict.fromkeys(
        ("class_label", "seed", "steps", "num_images"), "integer")
    testbed = {p["parameter_name"]: p["type"]["type"] for p in api["/testbed"]["parameters"]}
    assert testbed == {"preset": "string", "weight": "number", "corrector_steps": "integer", "steps": "integer",
                       "num_samples": "integer", "seed": "integer", "weak_factor": "number"}
    assert not [p for p in compare | testbed if p.startswith(("param_", "value_"))]
    assert [r["label"] for r in api["/compare"]["returns"]][-1] == "Model description"
