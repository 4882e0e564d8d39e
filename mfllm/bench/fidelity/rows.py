"""The bench's rows: LLM methods (built-in names and ``--variant NAME=BASE:key=val,...``) and the
LLM-free rows every bench scores beside them.

LLM rows: ``mf``, ``state``, ``recent``, ``popular`` (the paper's methods), the ablations ``mf-llm`` (the
LLM summariser writes m_t) and ``mf-tf`` (teacher forcing: the mean field is fed the real actions), the
diagnostics ``mf-empty`` (the policy always reads the empty mean field) and ``mf-shuffled`` (another
event's mean field, from this bench's ``mf`` run), plus user variants (:func:`parse_variant`).

LLM-free rows (no simulation; scored by the same code): the smooth baselines ``persistence`` and
``marginal``, and the sampled crowds ``persistence-sampled``, ``marginal-sampled``, ``oracle-sampled``
(the ceiling of any sampler: each bin's real actions, resampled), ``oracle-mix`` (the whole rollout's
actions, resampled: right mix, no timing) and ``mf-oracle`` (a label model reading the mean field's label shares);
see :mod:`mfllm.bench.fidelity.label_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel

from mfllm.errors import ConfigError

BASELINES: tuple[str, ...] = ("persistence", "marginal")
SAMPLED_ROWS: tuple[str, ...] = ("persistence-sampled", "marginal-sampled", "oracle-sampled", "oracle-mix",
                                  "mf-oracle")
ORACLE = "oracle-sampled"
SAMPLED_BASELINES: tuple[str, ...] = ("persistence-sampled", "marginal-sampled")  # what mf must beat (issue 14)
BASE_METHODS: tuple[str, ...] = ("mf", "state", "recent", "popular")
DEFAULT_METHODS = "mf,state,recent,popular"
NO_METHODS = "none"  # --methods none: only the LLM-free rows
Context = Literal["own", "empty", "shuffled"]


class MethodSpec(BaseModel, frozen=True, extra="forbid"):
    """One LLM row of the table: a method and its settings."""

    name: str
    method: Literal["mf", "state", "recent", "popular"]
    meanfield: Literal["stats", "llm"] | None = None  # None = the bench's --meanfield
    teacher_forcing: bool = False
    policy_adapter: str | None = None  # a LoRA adapter directory (peft)
    meanfield_adapter: str | None = None
    context: Context = "own"  # mf only: own | empty (always the empty mean field) | shuffled (another event's)
    meanfield_max_new_tokens: int | None = None  # llm mean field's summary budget (None: SimConfig's default)
    meanfield_decay: float | None = None  # stats mean fields' memory per step (None: SimConfig's default)
    temperature: float | None = None  # the policy's sampling temperature (None: SimConfig's default, 1)
    top_p: float | None = None  # the policy's nucleus (None: SimConfig's default, 1)
    meanfield_header: bool | None = None  # decide models: the stats mean field counts the header's labels

    @property
    def is_mf(self) -> bool:
        return self.method == "mf"


BUILTIN: dict[str, MethodSpec] = {
    "mf": MethodSpec(name="mf", method="mf"),
    "state": MethodSpec(name="state", method="state"),
    "recent": MethodSpec(name="recent", method="recent"),
    "popular": MethodSpec(name="popular", method="popular"),
    "mf-llm": MethodSpec(name="mf-llm", method="mf", meanfield="llm"),
    "mf-tf": MethodSpec(name="mf-tf", method="mf", teacher_forcing=True),
    "mf-empty": MethodSpec(name="mf-empty", method="mf", context="empty"),
    "mf-shuffled": MethodSpec(name="mf-shuffled", method="mf", context="shuffled"),
}

_KEYS = {
    "meanfield": "meanfield", "mf": "meanfield",
    "teacher_forcing": "teacher_forcing", "tf": "teacher_forcing",
    "policy_adapter": "policy_adapter", "policy": "policy_adapter",
    "meanfield_adapter": "meanfield_adapter", "mfa": "meanfield_adapter",
    "context": "context",
    "meanfield_max_new_tokens": "meanfield_max_new_tokens", "mfmax": "meanfield_max_new_tokens",
    "meanfield_decay": "meanfield_decay", "decay": "meanfield_decay",
    "temperature": "temperature", "temp": "temperature",
    "top_p": "top_p",
    "meanfield_header": "meanfield_header", "mfheader": "meanfield_header",
}
# the short key a message names (what users type)
_SHORT = {"teacher_forcing": "tf", "meanfield_header": "mfheader", "meanfield_decay": "decay", "temperature": "temp"}
_RANGES = {"meanfield_decay": (0.0, 1.0, False), "temperature": (0.0, 5.0, False), "top_p": (0.0, 1.0, True)}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _value(key: str, v: str, text: str):
    """One variant option's value, checked (the message names the short key a user typed)."""
    if key in ("teacher_forcing", "meanfield_header"):
        if v.lower() not in _TRUE + _FALSE:
            raise ConfigError(f"variant {text!r}: {_SHORT[key]} must be true or false", field="variant")
        return v.lower() in _TRUE
    if key == "meanfield" and v not in ("stats", "llm"):
        raise ConfigError(f"variant {text!r}: meanfield must be stats or llm", field="variant")
    if key == "context" and v not in ("own", "empty", "shuffled"):
        raise ConfigError(f"variant {text!r}: context must be one of own, empty, shuffled", field="variant")
    if key == "meanfield_max_new_tokens":
        if not v.isdigit() or int(v) < 1:
            raise ConfigError(f"variant {text!r}: mfmax must be a whole number >= 1", field="variant")
        return int(v)
    if key in _RANGES:
        lo, hi, lo_open = _RANGES[key]
        try:
            x = float(v)
        except ValueError:
            x = float("nan")
        if not (lo < x <= hi if lo_open else lo <= x <= hi):
            raise ConfigError(f"variant {text!r}: {_SHORT.get(key, key)} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]",
                              field="variant")
        return x
    return v


def parse_variant(text: str) -> MethodSpec:
    """``NAME=BASE[:key=val,key=val...]`` -> a row named NAME.

    BASE is a method (mf, state, recent, popular) or a built-in row (mf-llm, mf-tf, ...). Keys:
    ``meanfield``/``mf`` (stats|llm), ``teacher_forcing``/``tf`` (true|false), ``policy_adapter``/``policy``
    (adapter dir), ``meanfield_adapter``/``mfa`` (adapter dir, for meanfield=llm), ``context`` (own|empty|
    shuffled; mf only), ``meanfield_max_new_tokens``/``mfmax`` (the llm mean field's summary budget),
    ``meanfield_decay``/``decay`` (0..1: how much of the past counts a stats mean field keeps per step),
    ``temperature``/``temp`` and ``top_p`` (the policy's sampling; the mean-field model keeps its own),
    ``meanfield_header``/``mfheader`` (true|false: a decide model's stats mean field counts its headers' labels).
    Example: ``mf-ib=mf:policy=ckpt/policy,mfa=ckpt/meanfield,mf=llm,mfmax=64``.
    """
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise ConfigError(f"variant {text!r}: expected NAME=BASE[:key=val,...]", field="variant")
    if name in BUILTIN or name in BASELINES or name in SAMPLED_ROWS or name == NO_METHODS:
        raise ConfigError(f"variant {text!r}: {name!r} is a built-in row name; choose another", field="variant")
    base, _, opts = rest.partition(":")
    base = base.strip()
    if base not in BUILTIN:
        raise ConfigError(f"variant {text!r}: unknown base {base!r} (choose one of {', '.join(BUILTIN)})",
                          field="variant")
    update: dict = {"name": name}
    for kv in filter(None, (x.strip() for x in opts.split(","))):
        k, eq, v = kv.partition("=")
        key = _KEYS.get(k.strip().lower())
        if not eq or key is None:
            raise ConfigError(f"variant {text!r}: bad option {kv!r} (keys: {', '.join(sorted(set(_KEYS)))})",
                              field="variant")
        update[key] = _value(key, v.strip(), text)
    spec = BUILTIN[base].model_copy(update=update)
    _check_spec(spec, text)
    return spec


def _check_spec(spec: MethodSpec, where: str) -> None:
    if not spec.is_mf and (spec.context != "own" or spec.teacher_forcing or spec.meanfield == "llm"):
        raise ConfigError(f"{where}: context / teacher forcing / meanfield=llm only apply to mf rows", field="variant")
    if spec.meanfield_max_new_tokens is not None and (not spec.is_mf or spec.meanfield == "stats"):
        raise ConfigError(f"{where}: mfmax only applies to rows with meanfield=llm", field="variant")
    if spec.meanfield_header and (not spec.is_mf or spec.meanfield == "llm" or spec.teacher_forcing):
        raise ConfigError(f"{where}: mfheader only applies to mf rows with a stats mean field and no teacher forcing",
                          field="variant")
    if spec.meanfield_decay is not None and (not spec.is_mf or spec.meanfield == "llm"):
        raise ConfigError(f"{where}: decay only applies to mf rows with a stats mean field", field="variant")


def parse_methods(methods: str, variants: Sequence[str] = ()) -> list[MethodSpec]:
    """The LLM rows: the comma-separated built-in names of ``methods`` (``none``: no LLM row), then each
    ``--variant``."""
    names = [m.strip() for m in (methods or "").split(",") if m.strip()]
    if names == [NO_METHODS]:
        names = []
    elif not names and not variants:
        raise ConfigError(f"no method to run (use --methods {NO_METHODS} for the LLM-free rows only)",
                          field="methods")
    specs: list[MethodSpec] = []
    for n in names:
        if n not in BUILTIN:
            raise ConfigError(f"unknown method {n!r}: choose from {', '.join(BUILTIN)} (or {NO_METHODS}) or define "
                              "it with --variant NAME=BASE:key=val,...", field="methods")
        specs.append(BUILTIN[n])
    specs += [parse_variant(v) for v in variants]
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ConfigError(f"row {s.name!r} is listed twice", field="methods")
        seen.add(s.name)
    if any(s.context == "shuffled" for s in specs) and "mf" not in seen:
        raise ConfigError("mf-shuffled reads the mean field of the bench's mf run: add mf to --methods",
                          field="methods")
    # mf first (the shuffled control reads it), shuffled rows last
    specs.sort(key=lambda s: (s.name != "mf", s.context == "shuffled"))
    return specs
