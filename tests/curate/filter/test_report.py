"""funnel.png: what the picture shows is what the report counts."""

from __future__ import annotations

from PIL import Image

from qvl.curate.filter import report as report_mod

BLUE = (0x4C, 0x72, 0xB0)


def test_funnel_bars_are_proportional_to_the_rows_remaining(tmp_path):
    report = {
        "input_rows": 1000, "kept_rows": 250,
        "funnel": [{"step": "input", "remaining": 1000, "dropped": 0},
                   {"step": "emoji", "remaining": 1000, "dropped": 0},  # dropped nothing: not drawn
                   {"step": "clip_score", "remaining": 500, "dropped": 500},
                   {"step": "duplicate", "remaining": 250, "dropped": 250}],
        "by_language": {"en": {"kept": 200, "share_pct": 80.0}, "zh": {"kept": 50, "share_pct": 20.0}},
        "by_source": {"laion": {"kept_by_lang": {"en": 150, "zh": 50}}, "coyo": {"kept_by_lang": {"en": 50}}},
    }
    report_mod.plot(report, tmp_path / "funnel.png")
    image = Image.open(tmp_path / "funnel.png").convert("RGB")
    pixels = image.load()

    def bar_lengths() -> list[int]:  # the blue run of each bar row, left panel only
        lengths, x0, row_height = [], 150, 30
        y = 0
        while y < image.height:
            run = sum(1 for x in range(x0, image.width // 2 + 300) if pixels[x, y] == BLUE)
            if run > 20:
                lengths.append(run)
                y += row_height  # past this bar
            y += 1
        return lengths

    first, second, third = bar_lengths()[:3]
    assert len(bar_lengths()) == 3
    assert abs(second / first - 0.5) < 0.01 and abs(third / first - 0.25) < 0.01
    assert list(tmp_path.iterdir()) == [tmp_path / "funnel.png"]
