"""Checks a shard folder against its manifest.

    python -m data_pipeline.verify SHARDS_DIR [--quick]

Prints one line per problem and exits 1 if there is any. Cheap checks (always): manifest schema,
every shard present with the size, header and record/token counts the manifest promises, record
accounting. Full checks (default on the command line): the sha256 of every file, and the tokenizer.
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


def verify_folder(folder: str | Path, full: bool = True, leftovers: bool = True) -> list[str]:
    """Problems found, one line each, each naming the file; [] means the folder is sound.
    leftovers: also report temporary files of killed writers (harmless to readers of the
    finished shards, so training start does not ask)."""
    folder = Path(folder)
    try:
        manifest = load_manifest(folder)
    except shard_io.ShardError as e:
        return [str(e)]
    problems = []
    n_views = len(manifest["settings"]["views"]["names"])
    for s in manifest["shards"]:
        prefix = folder / "shards" / s["name"]
        try:
            reader = shard_io.ShardReader(prefix)
        except shard_io.ShardError as e:
            problems.append(str(e))
            continue
        for ext in ("bin", "idx"):
            size = Path(f"{prefix}.{ext}").stat().st_size
            if size != s[f"{ext}_bytes"]:
                problems.append(f"{prefix}.{ext}: {size} bytes, manifest says {s[f'{ext}_bytes']}")
        if (reader.n_records, reader.n_tokens, reader.n_views) != (
            s["records"],
            s["tokens"],
            n_views,
        ):
            problems.append(
                f"{prefix}: holds {reader.n_records} records / {reader.n_tokens} tokens / "
                f"{reader.n_views} views, manifest says {s['records']} / {s['tokens']} / {n_views}"
            )
        elif reader.n_records and reader.view_lengths.sum(dtype="u8") != reader.n_tokens:
            problems.append(f"{prefix}.idx: view lengths do not add up to the token count")
        if full:
            for ext in ("bin", "idx"):
                got = shard_io.sha256_file(f"{prefix}.{ext}")
                if got != s[f"{ext}_sha256"]:
                    problems.append(f"{prefix}.{ext}: sha256 {got[:12]}… differs from the manifest's "
                                    f"{s[f'{ext}_sha256'][:12]}…: the file changed or is corrupt")  # fmt: skip
    skipped = sum(manifest["skipped"].values())
    if manifest["input_records"] != manifest["written_records"] + skipped:
        problems.append(f"{folder}/manifest.json: {manifest['input_records']} input records != "
                        f"{manifest['written_records']} written + {skipped} skipped")  # fmt: skip
    stale = [*folder.glob("*.tmp*"), *(folder / "shards").glob("*.tmp*")] if leftovers else []
    for leftover in sorted(stale):
        problems.append(f"{leftover}: temporary file of a killed or failed writer; rerunning "
                        "preprocess removes it (or delete it)")  # fmt: skip
    if full:
        problems.extend(_verify_tokenizer(folder, manifest))
    return problems


def _verify_tokenizer(folder: Path, manifest: dict) -> list[str]:
    tok_dir = folder / manifest["tokenizer"]["dir"]
    if not (tok_dir / "tokenizer.json").exists():
        return [f"{tok_dir}: tokenizer missing"]
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
    parser.add_argument("--quick", action="store_true", help="skip checksums (sizes/headers only)")
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
                  + (", checksums match" if not args.quick else ""))  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
