"""The statistics corpus and its seeded sample (SPEC §4): which texts C0 is computed from.

Local text files or folders (WikiText .txt/.raw files split into articles at their title lines, else paragraphs)
or hub corpora (streamed with `datasets`; the sample is drawn from the first `pool_articles` articles of the
stream, shuffled with the seed, not from the whole corpus). Texts are tokenized with the tokenizer's special
tokens (a BOS where the tokenizer adds one), as the references' TokenizedDataset does, and truncated at
max_length.
"""
import hashlib
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from util.errors import InputError

log = logging.getLogger(__name__)

HUB_POOL_ARTICLES = 10_000
WIKITEXT_103 = ("wikitext", "wikitext-103-raw-v1")
HUB_CORPORA = {  # corpus name -> (dataset path, config) tried in order; the first that loads is used
    "wikipedia": [("wikipedia", "20200501.en"), ("wikimedia/wikipedia", "20231101.en"), WIKITEXT_103],
    "wikitext-103": [WIKITEXT_103],
}
LOCAL_SUFFIXES = (".txt", ".raw")


class CorpusUnavailable(RuntimeError):
    """The statistics corpus cannot be loaded here (no `datasets` package, no network, no such source)."""


def _is_wikitext_title(line: str) -> bool:
    """WikiText marks an article title as ' = Title = ' and sections as ' = = Section = = '."""
    stripped = line.strip()
    return len(stripped) > 4 and stripped.startswith("= ") and stripped.endswith(" =") and stripped[2] != "="


def split_articles(text: str) -> list[str]:
    """WikiText articles (split at title lines), else paragraphs separated by blank lines; no empties."""
    lines = text.splitlines()
    if any(_is_wikitext_title(line) for line in lines):
        articles, current = [], []
        for line in lines:
            if _is_wikitext_title(line) and current:
                articles.append("\n".join(current))
                current = []
            current.append(line)
        articles.append("\n".join(current))
    else:
        articles = re.split(r"\n\s*\n", "\n".join(lines))
    return [article.strip() for article in articles if article.strip()]


def sanitise(name: str) -> str:
    """A name safe as one path component (cache folders and files)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "_"


@dataclass(frozen=True)
class CorpusSource:
    """One place texts can come from: `key` identifies it (for the cache) without loading it."""
    description: str
    dir_name: str  # readable folder name in the cache
    key: dict
    local_files: tuple = ()  # set for a local corpus
    hub: tuple = ()  # (dataset path, config) for a hub corpus


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if files:
            return files
        raise InputError(f"no {'/'.join(LOCAL_SUFFIXES)} files", f"the statistics corpus directory {path}",
                         "put the corpus text there, or pass another corpus (hparams mom2_dataset, --stats_corpus)")
    raise InputError(f"statistics corpus {str(path)!r} not found", "hparams mom2_dataset / --stats_corpus",
                     f"give a text file, a directory of {'/'.join(LOCAL_SUFFIXES)} files, or one of "
                     f"{sorted(HUB_CORPORA)}")


def read_corpus_file(path: Path) -> str:
    """A local corpus file's text; an error naming the file when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"text that is not UTF-8 ({error.reason} at byte {error.start})", f"corpus file {path}",
                         "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out of the corpus") from None


def check_corpus(corpus: str) -> None:
    """Before a model loads: a local corpus exists and is UTF-8 text (a hub corpus is checked when it loads)."""
    if corpus not in HUB_CORPORA:
        for path in _local_files(Path(corpus).expanduser().resolve()):
            read_corpus_file(path)


def corpus_sources(corpus: str, pool_articles: int) -> list[CorpusSource]:
    """The candidate sources for `corpus` in the order they are tried."""
    if corpus in HUB_CORPORA:
        return [
            CorpusSource(
                description=f"{path} {config} (first {pool_articles} articles of train, streamed)",
                dir_name=sanitise(f"{path}-{config}"),
                key={"kind": "hub", "path": path, "config": config, "split": "train",
                     "pool_articles": pool_articles},
                hub=(path, config),
            )
            for path, config in HUB_CORPORA[corpus]
        ]
    path = Path(corpus).expanduser().resolve()
    files = _local_files(path)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return [CorpusSource(
        description=f"{path.name} (local: {path})",
        dir_name=sanitise(path.name),
        key={"kind": "local", "path": str(path), "files": [f.name for f in files], "sha256": digest.hexdigest()},
        local_files=tuple(files),
    )]


def _hub_articles(path: str, config: str, pool_articles: int) -> list[str]:
    """The first `pool_articles` articles of a streamed hub dataset (WikiText rows are lines: grouped)."""
    import datasets  # lazy: optional dependency, needs network

    rows = datasets.load_dataset(path, config, split="train", streaming=True)
    if (path, config) != WIKITEXT_103:
        articles = []
        for row in rows:
            if row["text"].strip():
                articles.append(row["text"])
            if len(articles) == pool_articles:
                break
        return articles
    lines, titles = [], 0
    for row in rows:
        if _is_wikitext_title(row["text"]):
            titles += 1
            if titles > pool_articles:
                break
        lines.append(row["text"].rstrip("\n"))
    return split_articles("\n".join(lines))[:pool_articles]


def load_articles(corpus: str, sources: list[CorpusSource]) -> tuple[CorpusSource, list[str]]:
    """Articles of the first source of `corpus` that loads, and that source."""
    source = sources[0]
    if source.local_files:
        articles = [a for f in source.local_files for a in split_articles(read_corpus_file(f))]
        if not articles:
            raise ValueError(f"corpus {source.description} holds no text")
        return source, articles
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise CorpusUnavailable(
            f"corpus {corpus!r} needs the `datasets` package and network access "
            "(pip install datasets); offline, pass a local corpus instead: a text file or a directory of "
            ".txt/.raw files such as a WikiText-2 copy (hparams mom2_dataset, or --stats_corpus / --corpus)"
        ) from None
    failures = []
    for source in sources:
        try:
            articles = _hub_articles(*source.hub, source.key["pool_articles"])
        except Exception as error:  # hub/network/script errors come in many types; each is reported below
            failures.append(f"{source.hub[0]} {source.hub[1]}: {type(error).__name__}: {error}")
            log.info("corpus %s did not load: %s", source.description, failures[-1])
            continue
        if articles:
            return source, articles
        failures.append(f"{source.hub[0]} {source.hub[1]}: no articles")
    raise CorpusUnavailable(
        f"corpus {corpus!r}: no source loaded (" + "; ".join(failures) + "); offline, pass a local corpus instead: a text "
        "file or a directory of .txt/.raw files such as a WikiText-2 copy (hparams mom2_dataset, or --stats_corpus)"
    )


# ---------------------------------------------------------------- sample

def sample_token_ids(tok, articles: list[str], *, seed: int, max_length: int,
                     n_tokens: int | None = None, n_articles: int | None = None) -> list[list[int]]:
    """Token ids of the seeded sample: articles in seeded order, each truncated to max_length.

    n_tokens (FastMEMIT cap): exactly that many tokens, the last text cut to fit. n_articles: that many
    whole articles. Exactly one of the two is given; a corpus too small for it is an error.
    """
    if (n_tokens is None) == (n_articles is None):
        raise ValueError("give exactly one of n_tokens, n_articles")
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    texts, total = [], 0
    for index in order:
        if n_articles is not None and len(texts) == n_articles:
            break
        if n_tokens is not None and total == n_tokens:
            break
        ids = tok(articles[index], truncation=True, max_length=max_length)["input_ids"]
        if n_tokens is not None:
            ids = ids[: n_tokens - total]
        if ids:
            texts.append(ids)
            total += len(ids)
    if n_tokens is not None and total < n_tokens:
        raise ValueError(
            f"the corpus has only {total} tokens ({len(articles)} articles, each truncated to {max_length}) "
            f"but the cap needs {n_tokens}; use a bigger corpus or a smaller dynamic_multiplier"
        )
    if n_articles is not None and len(texts) < n_articles:
        raise ValueError(
            f"the corpus has only {len(texts)} non-empty articles but mom2_n_samples is {n_articles}; "
            "use a bigger corpus or a smaller mom2_n_samples"
        )
    return texts

