"""Small rooms: no product module grows past what one can hold in one's head. A module
that needs more is split by concern (README, Architecture), not let grow."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("gateway", "scheduler", "worker_image/wanwu_worker")
MOST_LINES = 500


def test_no_product_module_is_over_500_lines() -> None:
    sizes = {
        path.relative_to(ROOT): len(path.read_text(encoding="utf-8").splitlines())
        for top in PRODUCT
        for path in (ROOT / top).rglob("*.py")
    }
    assert len(sizes) > 50  # the walk found the product
    over = {str(path): lines for path, lines in sorted(sizes.items()) if lines > MOST_LINES}
    assert not over, f"modules over {MOST_LINES} lines (split them by concern): {over}"
