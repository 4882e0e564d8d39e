"""Decide, then write: the short decision header a policy writes before its action text.

A "decide" policy model (mfllm.training.decide) writes, on the action's line, a header of label tokens and
then the text, e.g. ``【评支信平】真的假的`` (comment, support, believe, calm). The header gives the model a
short categorical decision that the mean field's label shares predict directly; the text follows it. A
header names the first four dimensions of ``decision.json`` (HEADER_DIMS) or all eight (FULL_HEADER_DIMS,
which adds sentiment, subjectivity, intent and rumour: every label dimension the evaluation scores); the
parser reads either, so one simulator runs both kinds of model. The format is data
(``prompts/<lang>/decision.json``), shared by training and inference.

At inference the header is split off here: the simulated action is the text alone (evaluation labels
the text, never the header) and the header's labels are kept beside it, so a run can report how often
the header and the text's own labels agree. A malformed or absent header never breaks a run: the text
is kept and the header recorded as missing (None).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from mfllm.backends.registry import REMOTE_BACKENDS
from mfllm.errors import ConfigError
from mfllm.paths import ASSETS, DEFAULT_MODEL
from mfllm.prompts.templates import PROMPTS_DIR, _check_lang

# The dimensions a header decides, in header order: the four of the first decide models, or all eight.
HEADER_DIMS: tuple[str, ...] = ("behavior_type", "stance", "belief_degree", "sentiment_state")
FULL_HEADER_DIMS: tuple[str, ...] = (*HEADER_DIMS, "sentiment_tendency", "subjectivity", "intent", "rumor")
HEADER_LAYOUTS = {len(HEADER_DIMS): HEADER_DIMS, len(FULL_HEADER_DIMS): FULL_HEADER_DIMS}
MAX_HEADER_CHARS = 96  # a close marker further away than this is not a header's (an 8-dimension English one: ~66)
# A decide model's folder says how to run it: {"decision_header": true, "meanfield": "stats-compact", "lang": "zh"}
POLICY_FILE = "mfllm_policy.json"


def header_dims(n: int) -> tuple[str, ...]:
    """The dimensions of an `n`-dimension header (4 or 8)."""
    if n not in HEADER_LAYOUTS:
        raise ConfigError(f"a decision header names {' or '.join(map(str, HEADER_LAYOUTS))} dimensions, not {n}",
                          field="header_dims")
    return HEADER_LAYOUTS[n]


def model_header_dims(model: str | Path | None) -> tuple[str, ...]:
    """The dimensions a decide model's header names: its POLICY_FILE's ``header_dims`` (4 when it names none,
    as the first decide models did)."""
    return header_dims(int(policy_spec(model).get("header_dims", len(HEADER_DIMS))))


def policy_model(backend_name: str, model: str | Path | None) -> str | Path | None:
    """The model whose POLICY_FILE a run follows: the one named; a local backend given none runs the shipped
    DEFAULT_MODEL; a server given none runs a model unknown here (None: resolve its name first)."""
    if model or (backend_name or "").strip().lower() in REMOTE_BACKENDS:
        return model or None
    return DEFAULT_MODEL


def policy_spec(model: str | Path | None) -> dict:
    """What a model's POLICY_FILE asks of the simulator ({} for any other model). ``model``: a local folder,
    or a served model's name; a shipped model's folder name (``mfllm serve`` serves a folder under its name)
    stands for that folder, so a run against a server behaves as the local run of the same model."""
    if not model:
        return {}
    path = Path(model).expanduser()
    if not path.is_dir() and path.name == str(model) and (ASSETS / "models" / path.name).is_dir():
        path = ASSETS / "models" / path.name
    path = path / POLICY_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def apply_policy(model: str | Path | None, sim: dict, *, keep_meanfield: bool = False) -> dict:
    """The SimConfig fields (``sim``, changed in place and returned) that a decide model folder asks for: it
    writes a decision header, and it reads the mean field it was trained on, with the memory (decay) its file
    names (unless ``keep_meanfield`` or a non-``stats`` mean field was chosen). Every entry point (simulate, the API, bench, forecast, intervene)
    calls this, so a decide model behaves the same everywhere; other models change nothing."""
    policy = policy_spec(model)
    if policy.get("decision_header") and "decision_header" not in sim:
        sim["decision_header"] = True
        if not keep_meanfield and sim.get("meanfield", "stats") == "stats" and policy.get("meanfield"):
            sim["meanfield"] = policy["meanfield"]
            # the memory of that mean field the model is run with, where a method reads it (an explicit
            # --meanfield-decay / meanfield_decay wins; the other methods' runs stay as they were)
            if (policy.get("meanfield_decay") is not None and sim.get("meanfield_decay") is None
                    and sim.get("method", "mf") == "mf"):
                sim["meanfield_decay"] = float(policy["meanfield_decay"])
    return sim


@cache
def header_format(lang: str = "zh") -> dict:
    """``decision.json`` of `lang`: open / close markers, separator and one token string per category."""
    _check_lang(lang)
    fmt = json.loads((PROMPTS_DIR / lang / "decision.json").read_text(encoding="utf-8"))
    fmt["reverse"] = {dim: {tok: cat for cat, tok in cats.items()} for dim, cats in fmt["labels"].items()}
    return fmt


def render_header(labels: dict[str, str], lang: str = "zh", dims: tuple[str, ...] = HEADER_DIMS) -> str:
    """The header for a label dict (the 8-dimension labels of an action; only `dims` are written)."""
    fmt = header_format(lang)
    return fmt["open"] + fmt["sep"].join(fmt["labels"][d][labels[d]] for d in dims) + fmt["close"]


@dataclass(slots=True)
class Decision:
    text: str  # the action's line without its header
    labels: dict[str, str] | None  # the header's labels (a layout's dimensions); None = missing or malformed
    raw_header: str | None = None  # what stood in the header position, if anything (malformed ones too)


def _parse_body(body: str, lang: str) -> dict[str, str] | None:
    fmt = header_format(lang)
    if fmt["sep"]:
        parts = [p for p in body.split(fmt["sep"]) if p]
    else:  # one token per dimension, each a known string: match greedily in order
        parts, rest = [], body
        for d in FULL_HEADER_DIMS:
            hit = next((t for t in sorted(fmt["reverse"][d], key=len, reverse=True) if rest.startswith(t)), None)
            if hit is None:
                break
            parts.append(hit)
            rest = rest[len(hit):]
            if not rest:
                break
        if rest:
            return None
    dims = HEADER_LAYOUTS.get(len(parts))
    if dims is None:
        return None
    out = {}
    for d, p in zip(dims, parts, strict=True):
        cat = fmt["reverse"][d].get(p.strip())
        if cat is None:
            return None
        out[d] = cat
    return out


def _header_like(body: str, lang: str) -> bool:
    """True when `body` is made only of label strings (and separators): a header, perhaps malformed."""
    fmt = header_format(lang)
    tokens = sorted({t for cats in fmt["labels"].values() for t in cats.values()}, key=len, reverse=True)
    rest = body.strip()
    while rest:
        if fmt["sep"] and rest.startswith(fmt["sep"]):
            rest = rest[len(fmt["sep"]):]
            continue
        hit = next((t for t in tokens if rest.startswith(t)), None)
        if hit is None:
            return False
        rest = rest[len(hit):]
    return True


def _closed_labels(s: str, lang: str, header: bool = False) -> int:
    """The length of a run of label strings at the start of `s` closed by the close marker, markers
    included; 0 when `s` does not start with one. In the `header` position the open marker is required
    and an empty run counts ("【】" is a malformed header); as residue the open marker is optional and an
    empty run (a bare "】") is text."""
    fmt = header_format(lang)
    opened = s.startswith(fmt["open"])
    if header and not opened:
        return 0
    start = len(fmt["open"]) if opened else 0
    end = s.find(fmt["close"], start)
    if end < 0 or end > MAX_HEADER_CHARS or (end == start and not header) or not _header_like(s[start:end], lang):
        return 0
    return end + len(fmt["close"])


def split_header(line: str, lang: str = "zh") -> Decision:
    """Split a generated action line into (header labels, text). Never raises.

    A line that starts with the open marker and closes it within MAX_HEADER_CHARS has a header; the
    text is what follows the close marker (leading spaces dropped), less any header residue right after
    it, kept in `raw_header`: label strings closed again ("传】", "辟辟】") or a second header. Decide
    models trained with the contrast term echo their header so after ~3 % of headers (mfllm-decide v2
    on val: 559 of 18,064 rollout actions); it is header, not the agent's words. A header made of label
    strings but not exactly one per dimension is recorded as missing (labels None) and still removed
    from the text. Anything else (no header, or a bracket that holds other words) is all text.
    """
    fmt = header_format(lang)
    s = line.lstrip()
    head = _closed_labels(s, lang, header=True)
    if not head:  # no header, or e.g. a real text that starts with 【...】: not ours, keep it whole
        return Decision(text=line.strip(), labels=None)
    body = s[len(fmt["open"]):head - len(fmt["close"])]
    while True:  # the header, then any residue, each followed by spaces
        rest = s[head:].lstrip()
        head = len(s) - len(rest)
        more = _closed_labels(rest, lang)
        if not more:
            break
        head += more
    return Decision(text=s[head:].strip(), labels=_parse_body(body, lang), raw_header=s[:head].rstrip())


def header_agreement(decisions: list[Decision], text_labels: list) -> dict:
    """How often a header's labels equal the labels of its own text (per dimension the headers name, and all
    of a header's dimensions at once: "joint").

    `text_labels`: one ActionLabels (or None) per decision, from a labeler run on the decision's text.
    Decisions without a header count as missing, not as disagreement.
    """
    n = missing = joint = 0
    per: dict[str, list[int]] = {}  # dimension -> [agreeing, headers naming it]
    for dec, lab in zip(decisions, text_labels, strict=True):
        if dec.labels is None:
            missing += 1
            continue
        if lab is None:
            continue
        n += 1
        same = True
        for d, cat in dec.labels.items():
            ok = cat == lab.labels.get(d)
            tally = per.setdefault(d, [0, 0])
            tally[0] += ok
            tally[1] += 1
            same &= ok
        joint += same
    order = [d for d in FULL_HEADER_DIMS if d in per] or list(HEADER_DIMS)
    return {"n": n, "missing": missing, "joint": joint / n if n else None,
            "per_dimension": {d: (per[d][0] / per[d][1] if d in per else None) for d in order}}
