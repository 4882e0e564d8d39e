"""Screenshot of report.html as a reader sees it: docs/img/report.png (linked from docs/evaluation.md).

    python scripts/screenshot_report.py [--out docs/img/report.png] [--keep DIR]

Makes a small real run of the shipped model on the shipped sample (`mfllm simulate --limit 2
--max-agents 60`), evaluates it (`mfllm evaluate`), and has headless Chromium screenshot the first
2400 px of the report at 1280 px wide. Needs Chromium (`apt-get update && apt-get install -y chromium`)
and, for the Chinese text, a CJK font (`apt-get install -y fonts-noto-cjk`); exits 2 naming what is
missing. The PNG is reduced to a 256-colour palette when that keeps it under 1 MB.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "img" / "report.png"
MAX_BYTES = 1_000_000
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# no network, no first-run UI, no profile left behind (a fresh --user-data-dir each time)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


def mfllm_cmd() -> list[str]:
    script = Path(sys.executable).with_name("mfllm")
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from mfllm.cli import main; main()"]


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def screenshot(html: Path, png: Path, width: int, height: int, exe: str) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mfllm-chromium-") as profile:
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
               f"--window-size={width},{height}", html.resolve().as_uri()]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    if not png.is_file():
        raise SystemExit(f"{exe} wrote no screenshot")


def shrink(png: Path) -> None:
    """A 256-colour palette (the page is flat colours and text: no visible loss) when over MAX_BYTES."""
    if png.stat().st_size <= MAX_BYTES:
        return
    from PIL import Image  # Pillow comes with matplotlib

    img = Image.open(png).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    img.save(png, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write (default docs/img/report.png)")
    ap.add_argument("--keep", type=Path, default=None, help="make the run here and keep it")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2400)
    args = ap.parse_args(argv)

    exe = browser()
    if exe is None:
        print("no Chromium found: apt-get update && apt-get install -y chromium", file=sys.stderr)
        return 2
    from mfllm.plotting import has_cjk_font  # imported here: the check above needs no matplotlib

    if not has_cjk_font():
        print("no Chinese font: apt-get install -y fonts-noto-cjk (the report and its plots show Chinese)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mfllm-report-") as tmp:
        run_dir = args.keep or Path(tmp) / "run"
        run([*mfllm_cmd(), "simulate", "--limit", "2", "--max-agents", "60", "--out", str(run_dir),
             "--quiet", "--force"])
        run([*mfllm_cmd(), "evaluate", str(run_dir), "--no-label-cache"])
        screenshot(run_dir / "report.html", args.out, args.width, args.height, exe)
    shrink(args.out)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
    if size > MAX_BYTES:
        print(f"warning: over {MAX_BYTES / 1e6:g} MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
