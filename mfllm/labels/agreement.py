"""How well a labeler agrees with the hand-labelled CED actions (tests/fixtures/labels/hand_labelled.jsonl).

    python -m mfllm.labels.agreement            # table for the rules labeler
    python -m mfllm.labels.agreement --speed    # + actions/second
    python -m mfllm.labels.agreement --split    # + dev (even rows) / held-out (odd rows)

``sample_actions`` is how the hand-labelled set was drawn (deterministic, from the CED repost files).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from mfllm.labels.base import Labeler
from mfllm.labels.dimensions import DIMENSIONS

DEFAULT_FIXTURE = (
    Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "labels" / "hand_labelled.jsonl"
)


def sample_actions(
    ced_dir: str | Path, n_text: int = 230, n_empty: int = 25, seed: int = 20250429
) -> list[dict]:
    """Deterministic sample of CED reposts: ``n_text`` with distinct non-empty texts and ``n_empty`` plain
    reposts, each from a different event drawn with ``random.Random(seed)`` over the sorted repost files.
    Returns dicts with event_id, mid, text, source (the event's source post text)."""
    ced = Path(ced_dir)
    files = sorted(ced.glob("*-repost/*.json"))
    rng = random.Random(seed)
    rng.shuffle(files)
    out: list[dict] = []
    seen: set[str] = set()
    want_empty, want_text = n_empty, n_text
    for f in files:
        if want_empty == 0 and want_text == 0:
            break
        posts = json.loads(f.read_text(encoding="utf-8"))
        posts.sort(key=lambda p: p["mid"])
        event_id = f.stem
        src_file = ced / "original-microblog" / f"{event_id}.json"
        source = json.loads(src_file.read_text(encoding="utf-8"))["text"] if src_file.exists() else ""
        empty = want_empty > 0 and (want_text == 0 or rng.random() < 0.1)
        pool = [
            p for p in posts if (not p["text"].strip()) == empty and (empty or p["text"].strip() not in seen)
        ]
        if not pool:
            continue
        p = rng.choice(pool)
        seen.add(p["text"].strip())
        out.append({"event_id": event_id, "mid": p["mid"], "text": p["text"], "source": source})
        if empty:
            want_empty -= 1
        else:
            want_text -= 1
    return out


def load_fixture(path: str | Path = DEFAULT_FIXTURE) -> list[dict]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def measure(labeler: Labeler, rows: list[dict] | None = None, *, non_empty_only: bool = False) -> dict:
    """Per-dimension accuracy (share of actions where the labeler's category equals the hand label).
    Returns {"n": ..., "unlabelled": ..., "accuracy": {dimension: float}, "mean": float}. An action the
    labeler leaves unlabelled (None) counts as wrong on every dimension."""
    rows = load_fixture() if rows is None else rows
    if non_empty_only:
        rows = [r for r in rows if r["text"].strip()]
    preds = labeler.label([r["text"] for r in rows])
    hits = dict.fromkeys(DIMENSIONS, 0)
    unlabelled = 0
    for r, p in zip(rows, preds, strict=True):
        if p is None:
            unlabelled += 1
            continue
        for d in DIMENSIONS:
            hits[d] += int(p.labels.get(d) == r["labels"][d])
    n = len(rows)
    acc = {d: hits[d] / n for d in DIMENSIONS} if n else dict.fromkeys(DIMENSIONS, 0.0)
    return {"n": n, "unlabelled": unlabelled, "accuracy": acc, "mean": sum(acc.values()) / len(acc)}


def confusion(labeler: Labeler, dimension: str, rows: list[dict] | None = None) -> dict[tuple[str, str], int]:
    """(hand label, labeler label) -> count for one dimension."""
    rows = load_fixture() if rows is None else rows
    preds = labeler.label([r["text"] for r in rows])
    out: dict[tuple[str, str], int] = {}
    for r, p in zip(rows, preds, strict=True):
        key = (r["labels"][dimension], p.labels[dimension] if p is not None else "<none>")
        out[key] = out.get(key, 0) + 1
    return out


def speed(labeler, texts: list[str], repeat: int = 1) -> float:
    """Actions per second of ``labeler.label_one`` over ``texts`` (fresh labeler recommended)."""
    t0 = time.perf_counter()
    for _ in range(repeat):
        for t in texts:
            labeler.label_one(t)
    return len(texts) * repeat / (time.perf_counter() - t0)


def _markdown(result: dict, title: str) -> str:
    lines = [f"**{title}** (n = {result['n']})", "", "| dimension | accuracy |", "|---|---|"]
    for d, a in result["accuracy"].items():
        lines.append(f"| {d} | {a * 100:.1f}% |")
    lines.append(f"| mean | {result['mean'] * 100:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from mfllm.labels.rules import RulesLabeler

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default=str(DEFAULT_FIXTURE))
    ap.add_argument("--speed", action="store_true", help="also measure actions/second on CED reposts")
    ap.add_argument("--ced", default="/work/shared/data/ced")
    ap.add_argument("--speed-files", type=int, default=300, help="events (repost files) timed by --speed")
    ap.add_argument("--split", action="store_true", help="also the dev / held-out halves")
    args = ap.parse_args(argv)
    rows = load_fixture(args.fixture)
    print(_markdown(measure(RulesLabeler(), rows), "all actions"))
    print()
    print(_markdown(measure(RulesLabeler(), rows, non_empty_only=True), "non-empty texts only"))
    if args.speed:
        texts: list[str] = []
        for f in sorted(Path(args.ced).glob("*-repost/*.json"))[: args.speed_files]:
            texts.extend(p["text"] for p in json.loads(f.read_text(encoding="utf-8")))
        stream = speed(RulesLabeler(), texts)
        distinct = list(dict.fromkeys(texts))
        lab = RulesLabeler()
        t0 = time.perf_counter()
        for t in distinct:
            lab._label(t)  # no memo: every text labelled from scratch
        nomemo = len(distinct) / (time.perf_counter() - t0)
        print(
            f"\nspeed: {len(texts):,} CED actions ({args.speed_files} events) through label_one: "
            f"{stream:,.0f} actions/s; their {len(distinct):,} distinct texts without the memo: "
            f"{nomemo:,.0f} texts/s"
        )
    if args.split:
        for name, part in (("dev (even rows)", rows[0::2]), ("held-out (odd rows)", rows[1::2])):
            print()
            print(_markdown(measure(RulesLabeler(), part), name))


if __name__ == "__main__":
    main()
