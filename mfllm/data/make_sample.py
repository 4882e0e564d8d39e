"""Build the shipped CED sample: `mfllm/assets/ced-sample/events.jsonl`.

    python -m mfllm.data.make_sample --ced /path/to/CED_Dataset --out mfllm/assets/ced-sample/events.jsonl

Picks `--n` events (default 40) of the TEST split (mfllm.data.split.split_of), half rumor and half
non-rumor, preferring events with 100-400 actions; among those, the order is the sha256 of the event id
(deterministic, not biased to low file numbers). Corpus activity is computed over the whole CED folder.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from mfllm.data.jsonl import write_jsonl
from mfllm.data.load import iter_events
from mfllm.data.schema import Event

SAMPLE_PATH = Path(__file__).resolve().parent.parent / "assets" / "ced-sample" / "events.jsonl"


def _key(ev: Event) -> str:
    return hashlib.sha256(ev.event_id.encode()).hexdigest()


def pick(events: list[Event], n: int, lo: int = 100, hi: int = 400) -> list[Event]:
    labels = sorted({e.label or "" for e in events})
    per = {lab: n // len(labels) + (1 if i < n % len(labels) else 0) for i, lab in enumerate(labels)}
    chosen: list[Event] = []
    for lab in labels:
        pool = [e for e in events if (e.label or "") == lab]
        # in range first (by hash), then the rest by distance to the range
        pool.sort(key=lambda e: (0 if lo <= len(e) <= hi else 1, max(lo - len(e), len(e) - hi, 0), _key(e)))
        chosen.extend(pool[: per[lab]])
    return sorted(chosen, key=lambda e: e.event_id)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ced", required=True, help="the CED root folder (holding original-microblog/)")
    ap.add_argument("--out", default=str(SAMPLE_PATH), help="output .jsonl (default: the shipped sample)")
    ap.add_argument("--n", type=int, default=40, help="number of events (default 40)")
    ap.add_argument("--split", default="test", help="split to draw from (default test)")
    args = ap.parse_args(argv)
    events = list(iter_events(args.ced, split=args.split, strict=True))
    chosen = pick(events, args.n)
    write_jsonl(chosen, args.out)
    size = Path(args.out).stat().st_size
    n_act = sum(len(e) for e in chosen)
    labels = {lab: sum(1 for e in chosen if e.label == lab) for lab in sorted({e.label for e in chosen})}
    print(f"wrote {len(chosen)} events ({n_act} actions, {labels}) to {args.out}: {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
