"""The Gradio page of ``guidekit demo``: guidance methods side by side, and the Gaussian-mixture testbed.

Two tabs, each one queued event with a public API name (``/compare`` and ``/testbed``, for ``gradio_client``):

* **Compare methods**: the model (the embedded default, a hub id or a local diffusers directory), a class label or
  a prompt, seed, steps, scheduler and up to four guidance texts; one image strip per method from the same seeds,
  captioned with its model calls, wall time and saturation, and a table of the same figures.
* **Gaussian testbed**: exact densities against samples of CFG with DDIM, CFG with DDPM, PCG and autoguidance
  on a 1-D Gaussian-mixture model, and autoguidance against its exact ODE end point
  (:mod:`guidekit.app.testbed_view`).

Requests queue, one at a time per tab. A bad input shows its message in the page; an unexpected failure shows its
type and message, and its traceback goes to the server's log only.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: the demo runs offline

import gradio as gr

from guidekit.app import testbed_view
from guidekit.app.compare import MAX_IMAGES, MAX_METHODS, Comparer
from guidekit.bridge.schedulers import SCHEDULER_NAMES

logger = logging.getLogger(__name__)

OWN_SCHEDULER = "pipeline's own"
DEFAULT_METHODS = ("cfg(scale=3)", "apg(scale=3, eta=0)", "pcg(gamma=5)", "")
METHOD_EXAMPLES = [
    ["cfg(scale=3)", "apg(scale=3, eta=0)", "pcg(gamma=5)", ""],
    ["cfg(scale=1)", "cfg(scale=3)", "cfg(scale=8)", "cfg(scale=8, rescale=0.7)"],
    ["cfg(scale=5)", "interval(cfg(scale=5), sigma_lo=0.28, sigma_hi=5.42)", "scheduled(cfg(scale=5), 'linear')",
     "cfg_zero_star(scale=5)"],
    ["cfg(scale=5)", "adaptive(cfg(scale=5), threshold=0.99)", "cfgpp(lam=0.6)", ""],
    ["cfg(scale=3)", "cfg(scale=3) + pag(scale=2)", "pag(scale=3)",
     "cfg(scale=3) + interval(pag(scale=2), sigma_lo=0.5, sigma_hi=inf)"],
    ["cfg(scale=3)", "cfg(scale=3) + seg(scale=3)", "cfg(scale=3) + seg(scale=3, blur_sigma=1)", "seg(scale=3)"],
    ["cfg(scale=5)", "tcfg(scale=5)", "mambo_g(scale=5, alpha=2)", "cfg_norm(scale=5)"],
]
METHOD_HELP = (
    "Guidance texts, one per column (blank = unused): `cfg(scale, rescale)`, `apg(scale, eta, norm_threshold, "
    "momentum)`, `interval(METHOD, sigma_lo, sigma_hi)`, `scheduled(METHOD, 'linear' | 'cosine' | ...)`, "
    "`adaptive(METHOD, threshold)`, `cfg_zero_star(scale)`, `pcg(gamma, corrector_steps)`, `cfgpp(lam, solver)`, "
    "`pag(scale, layers='mid')` (perturbed attention), `seg(scale, blur_sigma, layers)` (blurred attention), "
    "`tcfg(scale)`, `mambo_g(scale, alpha)`, `cfg_norm(scale, variant)`; terms add: `cfg(scale=3) + pag(scale=2)`. "
    "PCG and CFG++ run their own sampler: keep the scheduler at the pipeline's own with them. See docs/guidance.md."
)
TABLE_HEADERS = ["method", "sampler", "model calls", "uncond rows skipped", "seconds", "saturation"]


def _integer(component: gr.Number | gr.Slider) -> Any:
    """``component`` with the API type ``integer`` (``view_api()``, typed clients) and its value passed on as sent.

    ``gr.Number(precision=0)`` would round (2.5 becomes 2) and a slider refuses out-of-range values in a message
    without the parameter's name; here a whole float from the page becomes an int (:func:`_as_int`) and any other
    value reaches the request's checks, which refuse it by name. The two methods are replaced on the instance:
    a subclass of a Gradio component makes Gradio write a ``.pyi`` file next to this module."""
    info = {**component.api_info(), "type": "integer"}
    component.api_info = lambda: info  # type: ignore[method-assign]
    component.preprocess = lambda payload: payload  # type: ignore[method-assign]
    return component


def _as_int(value: Any) -> Any:
    """A whole float from a number box as an int; anything else unchanged, for the checks to name."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _page_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show a bad input's message in the page; keep tracebacks in the server's log."""

    @functools.wraps(fn)
    def handler(*args: Any) -> Any:
        try:
            return fn(*args)
        except (ValueError, TypeError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            logger.exception("demo request failed")
            raise gr.Error(f"the request failed: {type(exc).__name__}: {exc}", print_exception=False) from None

    return handler


def build_app(comparer: Comparer) -> gr.Blocks:
    """The demo's page, comparing on ``comparer``'s pipelines."""

    @_page_errors
    def compare(model: str, scheduler: str, class_label: float | None, prompt: str, negative_prompt: str,
                seed: float, steps: float, num_images: float, method_1: str, method_2: str, method_3: str,
                method_4: str) -> tuple[list[tuple[Any, str]], list[list[Any]], str]:
        results = comparer.compare(
            [method_1, method_2, method_3, method_4], model=model, prompt=prompt, negative_prompt=negative_prompt,
            class_label=None if class_label is None else _as_int(class_label), seed=_as_int(seed),
            steps=_as_int(steps), scheduler=None if scheduler == OWN_SCHEDULER else scheduler,
            num_images=_as_int(num_images))
        gallery = [(r.strip(), r.caption()) for r in results]
        rows = [[r.guidance, r.scheduler, r.model_calls, r.uncond_rows_skipped, round(r.seconds, 3),
                 round(r.saturation, 4)] for r in results]
        return gallery, rows, comparer.describe(model)

    @_page_errors
    def testbed(preset: str, weight: float, corrector_steps: float, steps: float, num_samples: float,
                seed: float, weak_factor: float) -> tuple[Any, list[list[Any]]]:
        result = testbed_view.run_testbed(preset, weight=weight, corrector_steps=_as_int(corrector_steps),
                                          steps=_as_int(steps), num_samples=_as_int(num_samples),
                                          seed=_as_int(seed), weak_factor=weak_factor)
        return testbed_view.plot_testbed(result), testbed_view.table(result)

    with gr.Blocks(title="guidekit demo") as demo:
        gr.Markdown("# guidekit: guidance methods side by side")
        with gr.Tab("Compare methods"):
            with gr.Row():
                model = gr.Textbox(value=comparer.model, label="Model", elem_id="model", info="'default' (the "
                                   "embedded digits model), a hub id or a local diffusers directory")
                scheduler = gr.Dropdown([OWN_SCHEDULER, *sorted(SCHEDULER_NAMES)], value=OWN_SCHEDULER,
                                        label="Scheduler")
            model_info = gr.Markdown(comparer.describe(), label="Model description")
            with gr.Row():
                class_label = _integer(gr.Number(value=3, label="Class label (class-conditional models)"))
                prompt = gr.Textbox(label="Prompt (text-to-image models)")
                negative_prompt = gr.Textbox(label="Negative prompt")
            with gr.Row():
                seed = _integer(gr.Number(value=0, label="Seed (image i uses seed + i)"))
                steps = _integer(gr.Number(value=20, label="Steps", elem_id="steps"))
                num_images = _integer(gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images per method"))
            with gr.Row():
                methods = [gr.Textbox(value=DEFAULT_METHODS[i], label=f"Method {i + 1}", elem_id=f"method-{i + 1}")
                           for i in range(MAX_METHODS)]
            gr.Markdown(METHOD_HELP)
            gr.Examples(METHOD_EXAMPLES, inputs=methods, label="Method sets")
            run = gr.Button("Compare", variant="primary", elem_id="compare-button")
            gallery = gr.Gallery(label="One column per method, same seeds", columns=MAX_METHODS, format="png",
                                 object_fit="contain", elem_id="compare-gallery")
            table = gr.Dataframe(headers=TABLE_HEADERS, label="Per method", elem_id="compare-table")
            run.click(compare, [model, scheduler, class_label, prompt, negative_prompt, seed, steps, num_images,
                                *methods], [gallery, table, model_info], api_name="compare")
        with gr.Tab("Gaussian testbed", elem_id="testbed-tab"):
            gr.Markdown(testbed_view.EXPLANATION)
            with gr.Row():
                preset = gr.Dropdown(list(testbed_view.PRESETS), value="gaussian", label="Data",
                                     info="gaussian: closed forms apply; mixture: a two-mode class")
                weight = gr.Number(value=3, label="Guidance weight w")
                corrector_steps = _integer(gr.Number(value=1, label="PCG corrector steps"))
                weak_factor = gr.Number(value=2, label="Autoguidance weak factor f", elem_id="testbed-weak-factor",
                                        info="the weak model: the same mixture, every component's std times f")
            with gr.Row():
                tb_steps = _integer(gr.Number(value=50, label="Steps"))
                num_samples = _integer(gr.Number(value=20000, label="Samples per method", elem_id="testbed-samples"))
                tb_seed = _integer(gr.Number(value=0, label="Seed"))
            tb_run = gr.Button("Run testbed", variant="primary", elem_id="testbed-button")
            plot = gr.Image(label="Samples against exact densities", format="png", elem_id="testbed-plot")
            tb_table = gr.Dataframe(headers=list(testbed_view.TABLE_HEADERS), label="Per method (W1 to target: to "
                                    "p(x|c)^w p(x)^(1-w) for CFG and PCG, to p(x|c)^w q(x|c)^(1-w) for "
                                    "autoguidance). Last rows: the two targets, whose W1 is the sampling-noise "
                                    "floor, and the exact autoguidance ODE, whose W1 is to its target",
                                    elem_id="testbed-table")
            tb_run.click(testbed, [preset, weight, corrector_steps, tb_steps, num_samples, tb_seed, weak_factor],
                         [plot, tb_table], api_name="testbed")
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def launch(comparer: Comparer, *, host: str = "127.0.0.1", port: int = 7860,
           block: bool = True) -> tuple[gr.Blocks, str]:
    """Serve the page; return the app and its local URL (``block=False`` returns at once, for tests).

    Gradio's start-up messages are off (the page is never shared, so its hint to set ``share=True`` does not
    apply); with ``block`` the local URL is printed, then the call serves until interrupted.
    """
    demo = build_app(comparer)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=False,
                            prevent_thread_lock=True, quiet=True, footer_links=["api"])
    if block:
        print(f"guidekit demo: serving on {url} (Ctrl-C stops it)", flush=True)
        demo.block_thread()
    return demo, url
