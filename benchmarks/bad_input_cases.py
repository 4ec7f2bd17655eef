"""Adversarial inputs at a scale factor ``n``: each function runs one case at n × its base size
and returns nothing; ``bad_input_scaling.py`` times them at 1×, 2×, 4× (linear is the goal)."""

from __future__ import annotations

import tempfile
from pathlib import Path


def curate_near_dup_same_hash(n: int) -> None:
    """12,000 × n images with one pHash (one popular picture under many URLs)."""
    import numpy as np

    from qvl.curate.download import near_duplicates

    near_duplicates(np.full(12_000 * n, 0x0F0F_1234_5678_9ABC, dtype=np.uint64), 4)


def curate_near_dup_shared_band(n: int) -> None:
    """12,000 × n distinct pHashes agreeing on one band and random elsewhere: one huge bucket."""
    import numpy as np

    from qvl.curate.download import near_duplicates

    rng = np.random.default_rng(0)
    near_duplicates((rng.integers(0, 2 ** 63, 12_000 * n, dtype=np.uint64) << np.uint64(13)) | np.uint64(0x1ABC), 4)


def curate_recipe_aliases(n: int) -> None:
    """A billion-laughs YAML recipe of 9 × n levels: refused before anything is expanded."""
    from qvl.errors import QvlError
    from qvl.recipes import load_recipe

    lines = ['a0: &a0 "lol"'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9 * n)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text("\n".join(lines) + "\nname: *a%d\n" % (9 * n - 1))
        try:
            load_recipe(path)
        except QvlError:
            return
        raise AssertionError("an alias tree was loaded")
