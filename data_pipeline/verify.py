"""Checks a shard folder against its manifest.

    python -m data_pipeline.verify SHARDS_DIR [--quick]

Prints one line per problem and exits 1 if there is any. Cheap checks (always, also at training
start): manifest schema and totals, every shard present with the size, header and record/token
counts the manifest promises, the sha256 of every .idx, records that tile their .bin, token ids
within the vocabulary, the tokenizer folder's hash. Full checks (default on the command line): the
sha256 of every .bin too.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from data_pipeline import shards as shard_io

SCHEMA_VERSION = 1


def load_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise shard_io.ShardError(
            f"{path}: missing (preprocessing unfinished, or not a shard folder)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise shard_io.ShardError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise shard_io.ShardError(
            f"{path}: schema_version {manifest.get('schema_version')!r}, this reader knows {SCHEMA_VERSION}"
        )
    return manifest


def manifest_hash(folder: str | Path) -> str:
    return hashlib.sha256((Path(folder) / "manifest.json").read_bytes()).hexdigest()


def verify_folder(
    folder: str | Path, full: bool = True, leftovers: bool = True, split: str | None = None
) -> list[str]:
    """Problems found, one line each, each naming the file; [] means the folder is sound.

    Always (cheap: no .bin is read): the manifest's totals against its shards, and each shard's
    header, sizes and counts against the manifest; the sha256 of each .idx and one vectorised
    pass over it (records tile the .bin, view tokens); token ids within the vocabulary (index
    format 2); the tokenizer folder's hash, when the folder exists. full: the sha256 of every
    .bin too, and a missing tokenizer folder is a problem. split: check only that split's shards.
    leftovers: also report temporary files of killed writers (harmless to readers of the
    finished shards, so training start does not ask)."""
    folder = Path(folder)
    try:
        manifest = load_manifest(folder)
    except shard_io.ShardError as e:
        return [str(e)]
    problems = _verify_totals(folder, manifest)
    n_views = len(manifest["settings"]["views"]["names"])
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    for s in manifest["shards"]:
        if split is None or s["split"] == split:
            prefix = folder / "shards" / s["name"]
            problems.extend(_verify_shard(prefix, s, n_views, vocab_size, full))
    stale = [*folder.glob("*.tmp*"), *(folder / "shards").glob("*.tmp*")] if leftovers else []
    for leftover in sorted(stale):
        problems.append(f"{leftover}: temporary file of a killed or failed writer; rerunning "
                        "preprocess removes it (or delete it)")  # fmt: skip
    problems.extend(_verify_tokenizer(folder, manifest, required=full))
    return problems


def _verify_shard(prefix: Path, s: dict, n_views: int, vocab_size: int, full: bool) -> list[str]:
    try:
        reader = shard_io.ShardReader(prefix, vocab_size=vocab_size)
    except shard_io.ShardError as e:
        return [str(e)]
    problems = []
    for ext in ("bin", "idx"):
        size = Path(f"{prefix}.{ext}").stat().st_size
        if size != s[f"{ext}_bytes"]:
            problems.append(f"{prefix}.{ext}: {size} bytes, manifest says {s[f'{ext}_bytes']}")
    held = (reader.n_records, reader.n_tokens, reader.n_views)
    if held != (s["records"], s["tokens"], n_views):
        problems.append(f"{prefix}: holds {held[0]} records / {held[1]} tokens / {held[2]} views, "
                        f"manifest says {s['records']} / {s['tokens']} / {n_views}")  # fmt: skip
    # The .idx is read whole below anyway (~1/50 of the .bin's bytes): hashing it costs about
    # as much again, and catches any change, also one that leaves it well-formed.
    for ext in ("bin", "idx") if full else ("idx",):
        got = shard_io.sha256_file(f"{prefix}.{ext}")
        if got != s[f"{ext}_sha256"]:
            problems.append(f"{prefix}.{ext}: sha256 {got[:12]}… differs from the manifest's "
                            f"{s[f'{ext}_sha256'][:12]}…: the file changed or is corrupt")  # fmt: skip
    try:
        view_tokens = reader.check_index()
    except shard_io.ShardError as e:
        return [*problems, str(e)]
    if reader.n_views == n_views and view_tokens != s["view_tokens"]:
        problems.append(
            f"{prefix}.idx: view tokens {view_tokens}, manifest says {s['view_tokens']}"
        )
    return problems


def _verify_totals(folder: Path, manifest: dict) -> list[str]:
    """The manifest's sums (per split, written, input) against its own shard entries, which
    _verify_shard holds against the files."""
    path, problems = folder / "manifest.json", []
    shards = manifest["shards"]
    n_views = len(manifest["settings"]["views"]["names"])
    for split, total in manifest["splits"].items():
        part = [s for s in shards if s["split"] == split]
        held = [sum(s["records"] for s in part), sum(s["tokens"] for s in part),
                [sum(s["view_tokens"][j] for s in part) for j in range(n_views)]]  # fmt: skip
        said = [total["records"], total["tokens"], total["view_tokens"]]
        if held != said:
            problems.append(f"{path}: splits.{split} says {said[0]} records / {said[1]} tokens / "
                            f"{said[2]} view tokens, its shards hold {held[0]} / {held[1]} / "
                            f"{held[2]}")  # fmt: skip
    written = sum(s["records"] for s in shards)
    if manifest["written_records"] != written:
        problems.append(f"{path}: written_records {manifest['written_records']}, its shards hold "
                        f"{written}")  # fmt: skip
    skipped = sum(manifest["skipped"].values())
    if manifest["input_records"] != manifest["written_records"] + skipped:
        problems.append(f"{path}: {manifest['input_records']} input records != "
                        f"{manifest['written_records']} written + {skipped} skipped")  # fmt: skip
    tok, settings = manifest["tokenizer"], manifest["settings"]
    if (tok["hash"], tok["vocab_size"]) != (settings["tokenizer_hash"], settings["vocab_size"]):
        problems.append(f"{path}: tokenizer hash / vocab_size differ from settings.tokenizer_hash "
                        "/ settings.vocab_size")  # fmt: skip
    ids = tok["special_ids"]
    flat = {k: v for k, v in ids.items() if k != "predictors"}
    flat.update({f"predictors[{i}]": v for i, v in enumerate(ids["predictors"])})
    outside = {k: v for k, v in flat.items() if v is not None and not 0 <= v < tok["vocab_size"]}
    if outside:
        problems.append(f"{path}: special ids {outside} lie outside the vocabulary of "
                        f"{tok['vocab_size']}")  # fmt: skip
    return problems


def _verify_tokenizer(folder: Path, manifest: dict, required: bool) -> list[str]:
    """The tokenizer folder the run will use against the hash the shards were made with (a few
    ms: it hashes the tokenizer's files). A run trains without one (only ids are needed): a
    missing folder is a problem only when required."""
    tok_dir = folder / manifest["tokenizer"]["dir"]
    if not (tok_dir / "tokenizer.json").exists():
        return [f"{tok_dir}: tokenizer missing"] if required else []
    from data_pipeline.tokenizer import tokenizer_hash

    got = tokenizer_hash(tok_dir)
    if got != manifest["tokenizer"]["hash"]:
        return [f"{tok_dir}: tokenizer hash {got[:12]}… differs from the manifest's: not the tokenizer "
                "these shards were made with"]  # fmt: skip
    return []


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.verify", description=__doc__.split("\n")[0]
    )
    parser.add_argument("folders", nargs="+", help="shard folders (each with manifest.json)")
    parser.add_argument("--quick", action="store_true", help="skip the .bin checksums")
    args = parser.parse_args(argv)
    bad = 0
    for folder in args.folders:
        problems = verify_folder(folder, full=not args.quick)
        for p in problems:
            print(p)
        bad += len(problems)
        if not problems:
            m = load_manifest(folder)
            print(f"OK {folder}: {len(m['shards'])} shards, {m['written_records']} records, "
                  f"{sum(s['tokens'] for s in m['shards'])} tokens"
                  + (", checksums match" if not args.quick else ", .idx checksums match"))  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
