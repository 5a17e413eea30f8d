"""The packed dataset: exactly-once per epoch across ranks, reshuffling, blending, exact resume."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.dataset import PackedDataset
from data_pipeline.shards import ShardError

SEQ = 256


def make(folder, **kw):
    return PackedDataset(folder, **{"seq_len": SEQ, "predictor_tokens": 1, "seed": 7, **kw})


def n_train(folder) -> int:
    return json.loads((folder / "manifest.json").read_text())["splits"]["train"]["records"]


def consume(ds, n_batches, batch=4, with_jepa=True):
    ids, batches = [], []
    for _ in range(n_batches):
        b = ds.next_batch(batch, with_jepa)
        ids.extend(b["sample_ids"].tolist())
        batches.append(b)
    return ids, batches


def test_ranks_see_every_record_once_per_epoch_and_reshuffle(bundled_shards):
    n = n_train(bundled_shards)
    ranks = [make(bundled_shards, rank=r, world_size=2, loop=False) for r in range(2)]
    epoch0 = [[], []]
    for r, ds in enumerate(ranks):
        while (b := ds.next_batch(8)) is not None:
            epoch0[r].extend(b["sample_ids"].tolist())
    assert not set(epoch0[0]) & set(epoch0[1])
    assert sorted(epoch0[0] + epoch0[1]) == list(range(n))
    # the next epoch is a different order of the same records
    ds = make(bundled_shards)
    order0, order1 = ds.epoch_order(0), ds.epoch_order(1)
    assert sorted(order0) == sorted(order1) and not np.array_equal(order0, order1)
    assert np.array_equal(order0, make(bundled_shards).epoch_order(0))  # deterministic


def test_rows_respect_seq_len_and_carry_structure(bundled_shards):
    ds = make(bundled_shards)
    _, batches = consume(ds, 3)
    b = batches[0]
    assert b["input_ids"].shape == (4, SEQ)
    assert len(b["pred_index"]) == len(b["sample_ids"])  # one pair per two-view record
    assert ds.stats.non_padding_fraction > 0.8
    lm_only = ds.next_batch(4, with_jepa=False)
    assert len(lm_only["pred_index"]) == 0 and (lm_only["attend_end"] == 0).all()


def test_records_per_row_gives_every_jepa_setting_the_same_lm_data(bundled_shards):
    """A fixed record count per row: LM-only, k=1 and k=3 rows hold the same records, and their
    LM targets are equal token for token (what paired LM vs LLM-JEPA runs rely on)."""

    def lm_targets(b):
        return [row[row != -100].tolist() for row in b["labels"]]

    batches = {
        (k, jepa): make(bundled_shards, predictor_tokens=k, records_per_row=3).next_batch(4, jepa)
        for k, jepa in [(1, False), (1, True), (3, True)]
    }
    ref = batches[1, False]
    assert len(ref["sample_ids"]) == 12  # 4 rows × 3 records
    for b in batches.values():
        assert b["sample_ids"].tolist() == ref["sample_ids"].tolist()
        assert lm_targets(b) == lm_targets(ref)
    assert len(batches[3, True]["pred_index"]) == 12
    with pytest.raises(ValueError, match="records_per_row"):
        make(bundled_shards, records_per_row=-1)


def test_resume_same_world_size_is_exact(bundled_shards):
    ranks = [make(bundled_shards, rank=r, world_size=2) for r in range(2)]
    for ds in ranks:
        consume(ds, 5)
    state = PackedDataset.merge_states([ds.state_dict() for ds in ranks])
    state = json.loads(json.dumps(state))  # it is saved as JSON
    for r, ds in enumerate(ranks):
        fresh = make(bundled_shards, rank=r, world_size=2)
        fresh.load_state_dict(state)
        a, ba = consume(ds, 4)
        b, bb = consume(fresh, 4)
        assert a == b
        for x, y in zip(ba, bb):
            assert all(np.array_equal(x[k], y[k]) for k in x)


def test_resume_at_another_world_size_covers_the_epoch_exactly_once(bundled_shards):
    n = n_train(bundled_shards)
    ranks = [make(bundled_shards, rank=r, world_size=2) for r in range(2)]
    seen = []
    for ds, k in zip(ranks, (7, 5)):  # ranks at different positions
        seen.extend(consume(ds, k)[0])
    state = PackedDataset.merge_states([ds.state_dict() for ds in ranks])
    single = make(bundled_shards, rank=0, world_size=1, loop=False)
    single.load_state_dict(state)
    while (b := single.next_batch(16)) is not None:
        seen.extend(b["sample_ids"].tolist())
    assert len(seen) == n and sorted(seen) == list(range(n))
    # and again to 3 ranks from the 1-rank state, mid-way
    single = make(bundled_shards, rank=0, world_size=1)
    single.load_state_dict(state)
    seen2 = consume(make(bundled_shards, rank=0, world_size=2), 7)[0]
    seen2 += consume(make(bundled_shards, rank=1, world_size=2), 5)[0]
    seen2 += consume(single, 3)[0]
    state2 = PackedDataset.merge_states([single.state_dict()])
    for r in range(3):
        ds = make(bundled_shards, rank=r, world_size=3, loop=False)
        ds.load_state_dict(state2)
        while (b := ds.next_batch(16)) is not None:
            seen2.extend(b["sample_ids"].tolist())
    assert sorted(seen2) == list(range(n))


def test_blend_weights(bundled_shards, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(bundled_shards, other)
    n = n_train(bundled_shards)
    ds = PackedDataset([bundled_shards, other], seq_len=SEQ, weights=[3, 1], seed=1)
    order = ds.epoch_order(0)
    assert len(order) == 2 * n
    from_first = int((order < n).sum())
    assert from_first == round(0.75 * 2 * n)  # oversampled: first source repeated
    assert np.bincount(order[order < n]).max() == 2
    assert len(set(order[order >= n].tolist())) == len(order[order >= n])  # subsampled, no repeats
    with pytest.raises(ValueError, match="weights"):
        PackedDataset([bundled_shards, other], seq_len=SEQ, weights=[1])


def test_dataset_refuses_corrupt_shards(bundled_shards, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(bundled_shards, folder)
    victim = folder / "shards" / "00000.train.bin"
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(ShardError, match="00000.train.bin"):
        make(folder)
    shutil.copytree(bundled_shards, folder, dirs_exist_ok=True)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    ds = make(folder)  # start-up does not read the .bin ...
    last = int(ds.sources[0].bounds[1]) - 1  # shard 0's last record holds the changed byte
    with pytest.raises(ShardError, match=r"00000\.train\.bin: record \d+ .* CRC32"):
        ds.record(last)  # ... the record's CRC32 catches it when it is read
    with pytest.raises(ShardError, match="sha256"):
        make(folder, verify_checksums=True)


def test_a_dataset_where_no_record_fits_is_an_error_not_an_endless_loop(bundled_shards):
    """data.overlong=skip with rows shorter than every record: the looping dataset skipped every
    record forever (11 minutes at 100% CPU before step 0). Now: one error naming the folder."""
    from data_pipeline.dataset import DatasetError

    ds = make(bundled_shards, seq_len=7, overlong="skip")  # the shortest LM document has 8
    with pytest.raises(DatasetError, match=rf"{bundled_shards}: no train record fits a row of 7"):
        ds.next_batch(2)
    assert ds.stats.skipped_overlong > 2 * n_train(bundled_shards)


def test_an_unfit_dataset_stops_training_with_one_line(tokenizer_dir, tmp_path):
    from conftest import chat, write_jsonl
    from engine_fixtures import launch, tiny_overrides

    from data_pipeline.preprocess import preprocess

    long = " ".join(["lines containing the word dog"] * 6)
    src = write_jsonl(tmp_path / "long.jsonl", [chat(f"{long} {i}", ".*dog.*") for i in range(40)])
    shards = tmp_path / "shards"
    preprocess(str(src), "messages", str(tokenizer_dir), str(shards), num_workers=1,
               val_fraction=0.2, progress=False)  # fmt: skip
    over = tiny_overrides(shards, tmp_path / "run", **{"data.seq_len_tokens": 16,
                                                       "data.overlong": "skip"})  # fmt: skip
    proc = launch(over, nproc=1, launcher="python", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {shards}: no train record fits a row of 16 tokens"), last
    assert "Traceback" not in proc.stderr


def test_start_up_checks_run_once_for_all_ranks(bundled_shards, monkeypatch):
    """The trainer checks the folders on rank 0 (pretrain.trainer.check_data_once) and builds
    every rank's datasets with verify=False: those read no index in full."""
    import data_pipeline.dataset as dataset_module

    calls = []
    real = dataset_module.verify_folder
    monkeypatch.setattr(dataset_module, "verify_folder",
                        lambda *a, **kw: calls.append(a) or real(*a, **kw))  # fmt: skip
    make(bundled_shards, rank=1, world_size=2, verify=False)
    assert calls == []
    make(bundled_shards)
    assert len(calls) == 1


def test_check_data_once_raises_one_line_naming_the_folder(bundled_shards, tmp_path):
    from pretrain.config import load_config
    from pretrain.trainer import check_data_once

    folder = tmp_path / "c"
    shutil.copytree(bundled_shards, folder)
    victim = folder / "shards" / "00000.val.idx"
    victim.write_bytes(victim.read_bytes()[:-4])
    cfg = load_config(str(Path(__file__).parents[1] / "recipes" / "tiny_cpu.yaml"),
                      [f"data.paths=[{folder}]"])  # fmt: skip
    with pytest.raises(ShardError, match=r"00000\.val\.idx"):
        check_data_once(cfg)  # the val split is checked too
    sound = load_config(str(Path(__file__).parents[1] / "recipes" / "tiny_cpu.yaml"),
                        [f"data.paths=[{bundled_shards}]"])  # fmt: skip
    check_data_once(sound)  # no error


def test_weights_are_token_shares(tokenizer_dir, tmp_path):
    """Two sources, records of ~4 and ~60 tokens, weights 1:3. Blending by tokens (the default)
    gives each source its weight's share of the epoch's tokens (within 1%); by records it gives
    the share of records, so the long source takes far more than its weight of the tokens."""
    from data_pipeline.preprocess import preprocess

    folders = []
    for name, words in (("short", 3), ("long", 45)):
        jsonl = tmp_path / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps({"text": " ".join(["match"] * words + [str(i)])}) + "\n"
                                 for i in range(300)))  # fmt: skip
        preprocess(str(jsonl), "text", str(tokenizer_dir), str(tmp_path / name), num_workers=1,
                   val_fraction=0.0, progress=False)  # fmt: skip
        folders.append(tmp_path / name)

    def token_shares(blend_by: str) -> list[float]:
        ds = PackedDataset(folders, seq_len=256, predictor_tokens=0, weights=[1, 3],
                           blend_by=blend_by, seed=3)  # fmt: skip
        tokens = [0, 0]
        for sid in ds.epoch_order(0).tolist():
            src, views = ds.record(sid)
            tokens[src] += sum(len(v) for v in views)
        return [t / sum(tokens) for t in tokens]

    by_tokens = token_shares("tokens")
    assert abs(by_tokens[0] - 0.25) < 0.01 and abs(by_tokens[1] - 0.75) < 0.01, by_tokens
    by_records = token_shares("records")
    assert by_records[1] > 0.95, by_records  # 3 long records per short one


@pytest.mark.parametrize("world", [1, 2])
def test_best_fit_sees_every_record_once_when_rows_switch_between_jepa_and_lm_only(
    bundled_shards, world
):
    """Loss dropout asks for JEPA rows and LM-only rows in turn: the unemitted rows of a window
    are laid out again, none is lost or repeated; a resume in the middle of a window (same world
    size) continues bit for bit."""
    n = n_train(bundled_shards)
    seen = []
    for r in range(world):
        ds = make(bundled_shards, rank=r, world_size=world, loop=False)
        k = 0
        while (b := ds.next_batch(3, with_jepa=k % 3 != 2)) is not None:
            seen.extend(b["sample_ids"].tolist())
            k += 1
    assert sorted(seen) == list(range(n))
    a = make(bundled_shards)
    consume(a, 5, batch=3)  # mid-window (16 rows each)
    assert a._rows or a._carry
    state = PackedDataset.merge_states([a.state_dict()])
    b = make(bundled_shards)
    b.load_state_dict(state)
    for with_jepa in (True, False, True):
        x, y = a.next_batch(3, with_jepa), b.next_batch(3, with_jepa)
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_best_fit_fills_long_tailed_rows():
    """Records of a long-tailed length mix at 4096 tokens: in order, a record that does not fit
    closes its row; best-fit over 16 rows' worth of records fills them to >= 97% (bench/
    packing_efficiency.py: 99.5% against 82.2% in order)."""
    from data_pipeline import packing

    sp = packing.SpecialIds(bos=1, eos=2, pad=0, view_sep=3, predictors=(4,))
    cfg = packing.PackingConfig(4096, sp, predictor_tokens=1)
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(150), 1.2, size=(3000, 2)).astype(int), 1, 3000)
    stats = packing.PackStats(seq_len=4096)
    items = [(i, packing.fit_record([np.full(a, 9), np.full(b, 9)], cfg, True, stats))
             for i, (a, b) in enumerate(lengths)]  # fmt: skip
    _, greedy = packing.pack_rows([[np.full(a, 9), np.full(b, 9)] for a, b in lengths], cfg)
    rows = packing.pack_best_fit(items, 4096, window_rows=16)
    assert all(sum(len(lay) for _, lay in row) <= 4096 for row in rows)
    assert sorted(sid for row in rows for sid, _ in row) == list(range(3000))  # each once
    share = sum(len(lay) for row in rows for _, lay in row) / (4096 * len(rows))
    assert share >= 0.97 > greedy.non_padding_fraction


def _vm_flags(array: np.ndarray) -> list[str]:
    """The kernel's flags of the memory map holding `array`'s first byte (/proc/self/smaps)."""
    address, flags, inside = array.__array_interface__["data"][0], None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and ":" not in head:  # a map's first line: start-end perms offset ...
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            flags = line.split()[1:]
    assert flags is not None, "no map holds the array"
    return flags


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc")
def test_shuffled_reads_advise_the_kernel_of_random_access(bundled_shards, monkeypatch):
    """A shuffled epoch over data larger than half the memory reads one short record from a
    random shard at a time: its token maps carry MADV_RANDOM (VmFlags "rr"), so a page fault
    reads a page, not the readahead window around it; its index maps keep readahead (a record's
    entry spans three columns). Data that fits keeps readahead (a preload once cached), and so do
    in-order readers (shuffle=False, the start-up checks' ShardReader)."""
    from data_pipeline import dataset
    from data_pipeline.shards import ShardReader

    def flags(reader) -> list[list[str]]:
        maps = reader._maps()
        return [_vm_flags(maps.tokens), _vm_flags(maps.offsets)]

    fits = make(bundled_shards)
    assert fits.next_batch(2) is not None and dataset.physical_memory() > 2 * 10**8
    assert not any("rr" in f for f in flags(fits.sources[0].readers[0]))
    monkeypatch.setattr(dataset, "physical_memory", lambda: 2 * fits.sources[0].bin_bytes - 2)
    shuffled, in_order = make(bundled_shards), make(bundled_shards, shuffle=False)
    assert shuffled.next_batch(2) is not None and in_order.next_batch(2) is not None
    assert ["rr" in f for f in flags(shuffled.sources[0].readers[0])] == [True, False]
    assert not any("rr" in f for f in flags(in_order.sources[0].readers[0]))
    plain = ShardReader(bundled_shards / "shards" / "00000.train")
    assert not any("rr" in f for f in flags(plain))
    assert [v.tolist() for v in shuffled.sources[0].record(3)] == [
        v.tolist() for v in plain.record(3)
    ]


def test_shared_start_up_checks_give_every_rank_the_one_process_error(bundled_shards, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    """check_data_once shares the checks among the ranks (dataset.check_share: every W-th shard
    over the folders' splits in order) and merges them (first_check_error): each shard is checked
    by one rank, and the error is the one a single process checking alone raises (check_folder:
    the first folder with a problem, all its problems in shard order, or the OSError that
    stopped its checks). Two ranks over gloo: tests/test_signals.py, the user-error test."""
    from data_pipeline import verify
    from data_pipeline.dataset import check_folder, check_share, first_check_error

    folder = Path(shutil.copytree(bundled_shards, tmp_path / "c"))
    for name in ("00001.train.idx", "00002.train.bin", "00004.train.idx", "00000.val.idx"):
        victim = folder / "shards" / name  # shards 1, 2, 4 of the train split; its val split
        victim.write_bytes(victim.read_bytes()[:-2])
    units = [(bundled_shards, s, False) for s in ("train", "val")]
    units += [(folder, s, False) for s in ("train", "val")]
    with pytest.raises(ShardError) as alone:
        check_folder(folder, "train", False)
    assert str(alone.value).count("truncated") == 3  # the val split's is not reached

    real, checked = verify._verify_shard, []
    fail_at = {"prefix": None}

    def counted(prefix, *args):
        checked.append(prefix.name)
        if prefix == fail_at["prefix"]:
            raise OSError(f"{prefix}: read error")
        return real(prefix, *args)

    monkeypatch.setattr(verify, "_verify_shard", counted)
    for world in (1, 2, 3):
        checked.clear()
        shares = [check_share(units, rank, world) for rank in range(world)]
        assert first_check_error(units, shares) == str(alone.value)
        assert sorted(checked) == sorted(2 * [f"{i:05d}.{s}" for i in range(6)
                                              for s in ("train", "val")])  # fmt: skip
        assert first_check_error(units[:2], [share[:2] for share in shares]) is None  # sound
        # The OSError that stops one process's checks (after shard 1's problem) stops theirs.
        fail_at["prefix"] = folder / "shards" / "00003.train"
        shares = [check_share(units, rank, world) for rank in range(world)]
        assert first_check_error(units, shares) == f"{folder}/shards/00003.train: read error"
        fail_at["prefix"] = None
