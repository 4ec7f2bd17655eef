"""Known layouts of web pair datasets, recognised by their columns.

A layout maps qvl's canonical columns (``url``, ``text``, ``width``, ``height``,
``clip_score``) onto a dataset's own column names; its name is the default ``source``
(the key of per-source thresholds). Columns a layout does not map are carried through.
"""

from __future__ import annotations

from dataclasses import dataclass

from qvl.errors import QvlError

SCORES = ("clip_score", "nsfw", "watermark", "aesthetic")  # numbers a layout may carry with each pair
NUMBERS = ("width", "height", *SCORES)
CANONICAL = ("url", "text", *NUMBERS)
REQUIRED = ("url", "text")


@dataclass(frozen=True)
class Layout:
    name: str
    columns: dict[str, str]  # canonical name -> the input's column name
    identify: frozenset[str] = frozenset()  # columns whose presence names this layout
    clip_model: str | None = None  # which CLIP the `clip_score` column came from
    headerless: tuple[str, ...] = ()  # column names of a TSV without a header line


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "datacomp",
        {
            "url": "url",
            "text": "text",
            "width": "original_width",
            "height": "original_height",
            "clip_score": "clip_l14_similarity_score",
        },
        identify=frozenset({"uid", "url", "text"}),
        clip_model="ViT-L-14/openai",
    ),
    Layout(
        "coyo",
        {
            "url": "url",
            "text": "text",
            "width": "width",
            "height": "height",
            "clip_score": "clip_similarity_vitb32",
            "nsfw": "nsfw_score_opennsfw2",
            "watermark": "watermark_score",
            "aesthetic": "aesthetic_score_laion_v2",
        },
        identify=frozenset({"url", "text", "clip_similarity_vitb32"}),
        clip_model="ViT-B-32/openai",
    ),
    Layout(
        "laion",
        {"url": "URL", "text": "TEXT", "width": "WIDTH", "height": "HEIGHT", "clip_score": "similarity",
         "nsfw": "punsafe", "watermark": "pwatermark", "aesthetic": "aesthetic"},
        identify=frozenset({"URL", "TEXT"}),
        clip_model="ViT-B-32/openai",
    ),
    Layout("cc3m", {"url": "url", "text": "caption"}, headerless=("caption", "url")),
    Layout("cc12m", {"url": "url", "text": "caption"}, headerless=("url", "caption")),
)

GENERIC = Layout("pairs", {c: c for c in CANONICAL})


class LayoutError(QvlError):
    pass


def detect(columns: list[str], where: str) -> Layout:
    """The first known layout whose identifying columns are present, else the generic one
    (canonical names). Optional columns (LAION files often lack WIDTH/HEIGHT/similarity)
    are mapped only where the file has them."""
    present = set(columns)
    for layout in (*LAYOUTS, GENERIC):
        if layout.identify <= present and {layout.columns[c] for c in REQUIRED} <= present:
            return restrict(layout, columns)
    raise LayoutError(
        f"{where}: unknown layout (columns: {', '.join(columns) or 'none'}); "
        "name the columns with --map url=COLUMN,text=COLUMN"
    )


def full(layout: Layout) -> Layout:
    """The known layout ``layout`` was restricted from (itself when it is not a known one)."""
    return next((known for known in (*LAYOUTS, GENERIC) if known.name == layout.name), layout)


def restrict(layout: Layout, columns: list[str]) -> Layout:
    """The layout with its mapping reduced to the columns this file really has."""
    present = set(columns)
    kept = {k: v for k, v in layout.columns.items() if v in present}
    return Layout(layout.name, kept, layout.identify, layout.clip_model, layout.headerless)


def headerless_tsv(lines: list[str], where: str) -> tuple[Layout, str] | None:
    """CC3M (``caption<TAB>url``) and CC12M (``url<TAB>caption``) ship TSVs with no header.
    Decided by the majority of the sampled two-field lines — one odd first line (a header
    someone added, a row with a relative URL) must not turn a whole file around — and said
    how: (layout, "cc12m: 198 of 200 sampled lines are url<TAB>caption"). None: not such a file."""
    votes = {"cc3m": 0, "cc12m": 0}
    two_fields = 0
    for line in lines:
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != 2:
            continue
        two_fields += 1
        is_url = [f.strip().lower().startswith(("http://", "https://")) for f in fields]
        if is_url == [False, True]:
            votes["cc3m"] += 1
        elif is_url == [True, False]:
            votes["cc12m"] += 1
    if not two_fields or two_fields < len(lines) / 2 or not any(votes.values()):
        return None
    name, n = max(votes.items(), key=lambda kv: kv[1])
    other = sum(votes.values()) - n
    if n <= 2 * other:
        raise LayoutError(f"{where}: neither caption<TAB>url (CC3M, {votes['cc3m']} lines) nor url<TAB>caption "
                          f"(CC12M, {votes['cc12m']} lines) is a clear majority of the first {len(lines)} lines; "
                          "name the columns with --map and a header line")
    order = "caption<TAB>url" if name == "cc3m" else "url<TAB>caption"
    return next(l for l in LAYOUTS if l.name == name), f"{name}: {n} of {len(lines)} sampled lines are {order}"


def from_mapping(mapping: dict[str, str], name: str = "pairs") -> Layout:
    unknown = set(mapping) - set(CANONICAL)
    if unknown:
        raise LayoutError(
            f"--map: unknown canonical column(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(CANONICAL)}"
        )
    missing = [c for c in REQUIRED if c not in mapping]
    if missing:
        raise LayoutError(f"--map must name {', '.join(missing)} (e.g. url=image_url,text=caption)")
    return Layout(name, dict(mapping))
