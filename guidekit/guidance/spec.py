"""The text form of guidance objects, for command lines, config files and sweeps.

``interval(apg(scale=2, eta=0), sigma_lo=0.28, sigma_hi=5.42)`` parses to
``Interval(APG(2.0, eta=0.0), 0.28, 5.42)``, and :func:`format_guidance` writes any guidance back
in the same form, so ``parse_guidance(format_guidance(g)) == g``. Names are case-insensitive and
underscores are optional (``cfg_zero_star``, ``CFGZeroStar``); arguments are numbers, strings,
``true``/``false``, ``inf``, lists, dicts, nested guidance calls, or a LinearAG fit
(``linear_ag(cfg(scale=5), fit=linear_ag_fit(modes=['cfg', 'linear'], coefficients={1: [0.4, 0.5, 0.1]}))``,
or ``fit='path/to/fit.json'``). The text is parsed with :mod:`ast`; nothing in it is evaluated.
"""

from __future__ import annotations

import ast
import dataclasses
import math

from guidekit.guidance.adaptive import AdaptiveGuidance
from guidekit.guidance.apg import APG
from guidekit.guidance.autoguidance import AutoGuidance
from guidekit.guidance.base import Guidance, GuidanceSum
from guidekit.guidance.cfg import CFG
from guidekit.guidance.cfg_norm import CFGNorm
from guidekit.guidance.cfg_zero import CFGZeroStar
from guidekit.guidance.cfgpp import CFGPP
from guidekit.guidance.experts import ByExpert
from guidekit.guidance.fdg import FDG
from guidekit.guidance.interval import Interval
from guidekit.guidance.linear_ag import LinearAG, LinearAGFit
from guidekit.guidance.mambo import MAMBOG
from guidekit.guidance.nag import NAG
from guidekit.guidance.pag import PAG
from guidekit.guidance.pcg import PCG
from guidekit.guidance.schedules import Scheduled
from guidekit.guidance.seg import SEG
from guidekit.guidance.slg import SLG, STG
from guidekit.guidance.tcfg import TCFG
from guidekit.limits import MAX_GUIDANCE_CHARS, MAX_GUIDANCE_DEPTH, check_text, shorten

#: Canonical text name of each guidance class.
NAMES: dict[type[Guidance], str] = {
    CFG: "cfg",
    APG: "apg",
    Interval: "interval",
    Scheduled: "scheduled",
    AdaptiveGuidance: "adaptive",
    CFGZeroStar: "cfg_zero_star",
    PCG: "pcg",
    CFGPP: "cfgpp",
    LinearAG: "linear_ag",
    PAG: "pag",
    SLG: "slg",
    STG: "stg",
    SEG: "seg",
    TCFG: "tcfg",
    MAMBOG: "mambo_g",
    CFGNorm: "cfg_norm",
    FDG: "fdg",
    NAG: "nag",
    AutoGuidance: "autoguidance",
    ByExpert: "by_expert",
}
#: Values that are not guidance methods but appear as arguments of one.
VALUES: dict[type, str] = {LinearAGFit: "linear_ag_fit"}
_ALIASES = {"ag": AdaptiveGuidance, "adaptiveguidance": AdaptiveGuidance, "linearag": LinearAG, "mambo": MAMBOG}


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


_BY_KEY: dict[str, type] = {_key(n): c for c, n in (NAMES | VALUES).items()} | _ALIASES


class GuidanceSyntaxError(ValueError):
    """A guidance text that does not parse."""


def _fail(text: str, why: str) -> GuidanceSyntaxError:
    accepted = ", ".join(sorted(set(NAMES.values())))
    return GuidanceSyntaxError(f"guidance={shorten(text)} does not parse: {why}; expected a call such as "
                               f"'interval(apg(scale=2, eta=0), sigma_lo=0.28, sigma_hi=5.42)' "
                               f"using {accepted}")


def _value(node: ast.expr, text: str) -> object:
    if isinstance(node, ast.Call):
        return _call(node, text)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _guidance(node, text)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)) \
            and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e, text) for e in node.elts]
    if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
        return {_value(k, text): _value(v, text) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _value(node.operand, text)
        if isinstance(inner, (int, float)):
            return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.Name):
        named = {"inf": math.inf, "true": True, "false": False, "none": None}
        if node.id.lower() in named:
            return named[node.id.lower()]
    raise _fail(text, f"unsupported argument {shorten(ast.unparse(node))}")


def _call(node: ast.Call, text: str) -> object:
    if not isinstance(node.func, ast.Name):
        raise _fail(text, f"{shorten(ast.unparse(node.func))} is not a method name")
    cls = _BY_KEY.get(_key(node.func.id))
    if cls is None:
        raise _fail(text, f"unknown method {shorten(node.func.id)}")
    args = [_value(a, text) for a in node.args]
    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise _fail(text, "'**' is not supported")
        kwargs[kw.arg] = _value(kw.value, text)
    try:
        return cls(*args, **kwargs)
    except TypeError as exc:
        raise _fail(text, f"bad arguments for {(NAMES | VALUES)[cls]}: {exc}") from None


def _depth(tree: ast.AST) -> int:
    """How many expressions deep ``tree`` nests (calls, lists, dicts and signs, counting the innermost value)."""
    deepest, stack = 0, [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        depth += isinstance(node, ast.expr)
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in ast.iter_child_nodes(node))
    return deepest


def parse_guidance(text: str) -> Guidance:
    """Parse the text form of a guidance (see the module docstring).

    Texts longer than :data:`~guidekit.limits.MAX_GUIDANCE_CHARS` characters or nesting deeper than
    :data:`~guidekit.limits.MAX_GUIDANCE_DEPTH` are refused before they are built; error messages repeat a long text
    shortened.
    """
    if not isinstance(text, str):
        raise TypeError(f"guidance={text!r} is not accepted; expected a string")
    check_text("guidance", text, high=MAX_GUIDANCE_CHARS, limit="MAX_GUIDANCE_CHARS")
    too_deep = f"it nests deeper than {MAX_GUIDANCE_DEPTH} (limit MAX_GUIDANCE_DEPTH)"
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise _fail(text, exc.msg) from None
    except RecursionError:  # Python's parser gives up on deep nesting before the depth check could run
        raise _fail(text, too_deep) from None
    if _depth(tree) > MAX_GUIDANCE_DEPTH:
        raise _fail(text, too_deep)
    return _guidance(tree.body, text)


def _guidance(node: ast.expr, text: str) -> Guidance:
    """A guidance call, or a sum of them (``cfg(scale=5) + pag(scale=3)``)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        try:
            return _guidance(node.left, text) + _guidance(node.right, text)
        except TypeError as exc:
            raise _fail(text, str(exc)) from None
    if not isinstance(node, ast.Call):
        raise _fail(text, "it is not a call or a sum of calls")
    guidance = _call(node, text)
    if not isinstance(guidance, Guidance):
        raise _fail(text, f"{node.func.id!r} is not a guidance method")  # type: ignore[attr-defined]
    return guidance


def _format_value(value: object) -> str:
    if isinstance(value, Guidance):
        return format_guidance(value)
    if type(value) in VALUES:
        return _format_call(VALUES[type(value)], value)
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(_format_value(v) for v in value)}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{_format_value(k)}: {_format_value(v)}' for k, v in value.items())}}}"
    return repr(value)


def _format_call(name: str, value: object) -> str:
    parts = [f"{f.name}={_format_value(getattr(value, f.name))}" for f in dataclasses.fields(value) if f.init]
    return f"{name}({', '.join(parts)})"


def format_guidance(guidance: Guidance) -> str:
    """The text form of ``guidance``; :func:`parse_guidance` reads it back to an equal object."""
    if isinstance(guidance, GuidanceSum):
        return " + ".join(format_guidance(t) for t in guidance.terms)
    if isinstance(guidance, AutoGuidance) and not isinstance(guidance.weak, str):
        raise TypeError(f"weak={type(guidance.weak).__name__}(...) has no text form; expected the path of a saved "
                        "denoiser to write autoguidance as text")
    name = NAMES.get(type(guidance))
    if name is None:
        raise TypeError(f"guidance={guidance!r} has no text form; expected one of {', '.join(NAMES.values())}")
    if isinstance(guidance, Scheduled):
        parts = [format_guidance(guidance.inner), repr(guidance.schedule)]
        parts += [f"{k}={_format_value(v)}" for k, v in guidance.params]
        return f"{name}({', '.join(parts)})"
    return _format_call(name, guidance)
