"""The class-conditional pixel pipeline of the embedded model: native CFG equals set_guidance, save/load, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

import guidekit
from guidekit.app.digits import coloured_digits, digit_shapes
from guidekit.bridge.class_pipeline import ClassConditionalPipeline


@pytest.fixture(scope="module")
def pipe() -> ClassConditionalPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=11, norm_num_groups=32).eval()
    p = ClassConditionalPipeline(unet, DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing",
                                                     set_alpha_to_one=True, clip_sample=False))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("scheduler", ["ddim", "heun", "dpmpp_2m"])
def test_native_cfg_equals_set_guidance(pipe: ClassConditionalPipeline, scheduler: str) -> None:
    from guidekit.bridge.schedulers import make_scheduler

    original = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler, original.config)
    try:
        gens = [torch.Generator().manual_seed(s) for s in range(4)]
        native = pipe([0, 3, 7, 10], num_inference_steps=5, guidance_scale=3.0, generator=gens, output_type="pt")
        pipe.set_guidance(guidekit.CFG(3.0))
        gens = [torch.Generator().manual_seed(s) for s in range(4)]
        guided = pipe([0, 3, 7, 10], num_inference_steps=5, guidance_scale=3.0, generator=gens, output_type="pt")
        assert pipe.guidance_stats.uncond_rows > 0
    finally:
        pipe.set_guidance(None)
        pipe.scheduler = original
    assert torch.equal(native.images, guided.images)


def test_per_image_seeds_do_not_depend_on_the_batch(pipe: ClassConditionalPipeline) -> None:
    both = pipe([1, 2], num_inference_steps=3, generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
                output_type="pt").images
    alone = pipe([2], num_inference_steps=3, generator=[torch.Generator().manual_seed(6)], output_type="pt").images
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-5)


def test_save_and_load_round_trip(pipe: ClassConditionalPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = ClassConditionalPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    a = pipe([4], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    b = loaded([4], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (a == b).all()


def test_bad_arguments_name_the_parameter(pipe: ClassConditionalPipeline) -> None:
    with pytest.raises(ValueError, match="class_labels="):
        pipe([11], num_inference_steps=2)
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        pipe([1], num_inference_steps=0)
    with pytest.raises(ValueError, match="output_type='latent'"):
        pipe([1], num_inference_steps=2, output_type="latent")


def test_digits_are_real_shapes_with_random_colours() -> None:
    train, test = digit_shapes("train"), digit_shapes("test")
    assert len(train[1]) + len(test[1]) == 1797 and set(test[1].tolist()) == set(range(10))
    a, labels = coloured_digits("test", torch.Generator().manual_seed(0))
    b, _ = coloured_digits("test", torch.Generator().manual_seed(1))
    assert a.shape == (len(labels), 3, 8, 8) and a.dtype == torch.uint8 and not torch.equal(a, b)
    with pytest.raises(ValueError, match="split='val'"):
        digit_shapes("val")


def test_euler_starts_at_its_first_sigma_and_matches_ddim() -> None:
    """DDIM is Euler's method on the probability-flow ODE in EDM units, so on the same timesteps the two agree.
    init_noise_sigma must be read after set_timesteps: before, Euler's is the training table's last sigma (about 2e4
    on the cosine schedule) and the images are noise."""
    from diffusers import EulerDiscreteScheduler

    from guidekit.bridge.loading import load_pipeline

    pipe, _ = load_pipeline("default")
    ddim_scheduler = pipe.scheduler
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    ddim = pipe([1, 4, 7, 9], num_inference_steps=50, guidance_scale=3.0, generator=gens, output_type="pt")
    pipe.scheduler = EulerDiscreteScheduler.from_config(ddim_scheduler.config)
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    euler = pipe([1, 4, 7, 9], num_inference_steps=50, guidance_scale=3.0, generator=gens, output_type="pt")
    assert pipe.scheduler.timesteps[0] == ddim_scheduler.timesteps[0]
    assert (euler.images - ddim.images).abs().mean() < 0.01


@pytest.mark.parametrize("scheduler", ["ddpm", "euler_a", "edm_heun_churn"])
def test_stochastic_samplers_draw_from_the_per_image_seeds(pipe: ClassConditionalPipeline, scheduler: str) -> None:
    """With one generator per image the run repeats exactly, whatever the global RNG does, and image i depends on
    seed i only (as in diffusers' pipelines, which hand the generator list to ``step``)."""
    from guidekit.bridge.schedulers import make_scheduler
    from guidekit.samplers import EDMHeunScheduler

    original = pipe.scheduler
    pipe.scheduler = (EDMHeunScheduler.from_config(original.config, s_churn=40.0) if scheduler == "edm_heun_churn"
                      else make_scheduler(scheduler, original.config))
    try:
        runs = []
        for seeds, global_seed in (((0, 1), 0), ((0, 1), 1), ((0, 2), 2)):
            torch.manual_seed(global_seed)
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            out = pipe([3, 3], num_inference_steps=6, guidance_scale=2.0, generator=gens, output_type="pt")
            runs.append(out.images)
    finally:
        pipe.scheduler = original
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][0], runs[2][0]) and not torch.equal(runs[0][1], runs[2][1])
