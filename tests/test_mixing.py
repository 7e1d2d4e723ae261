"""Dataset mixing: exact shares of records or tokens, under/over/count/multiple sizes, determinism (runs, seeds, world
sizes), LLaMA-Factory's mix_strategy/interleave_probs giving the same mix, the report, and bad settings stopped by
config validation with the key and the fix named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from launcher.config import ConfigError, DatasetConfig, to_object
from launcher.data import prepare
from launcher.inspect_data import report
from launcher.mixing import MixSpec, mix_indices, problems, resolve
from launcher.packing import load_plan, plan_path
from launcher.validate import validate
from tests.conftest import run_launcher
from tests.test_configs import _compose
from tests.test_data import TOKENIZER_DIR, template

NAMES = ["alpha", "beta", "gamma"]
SIZES = {"alpha": 5000, "beta": 3000, "gamma": 2000}  # 10k records available


def lf_folder(root: Path, sizes: dict[str, int] = SIZES) -> Path:
    """A LLaMA-Factory data folder with one dataset per name, in three formats, records of varied length; every
    record's prompt starts with its dataset's name so the prepared rows can be traced back."""
    d = root / "lf"
    d.mkdir(parents=True, exist_ok=True)
    info = {}
    for k, (name, n) in enumerate(sizes.items()):
        def reply(i: int) -> str:
            return " ".join(["word"] * (1 + (i * 7 + k) % (10 + 10 * k)))

        if k % 3 == 0:
            recs = [json.dumps({"instruction": f"{name} question {i}", "output": reply(i)}) for i in range(n)]
            (d / f"{name}.jsonl").write_text("\n".join(recs) + "\n")
            info[name] = {"file_name": f"{name}.jsonl"}
        elif k % 3 == 1:
            recs = [{"conversations": [{"from": "human", "value": f"{name} question {i}"},
                                       {"from": "gpt", "value": reply(i)}]} for i in range(n)]
            (d / f"{name}.json").write_text(json.dumps(recs))
            info[name] = {"file_name": f"{name}.json", "formatting": "sharegpt"}
        else:
            recs = [json.dumps({"messages": [{"role": "user", "content": f"{name} question {i}"},
                                             {"role": "assistant", "content": reply(i)}]}) for i in range(n)]
            (d / f"{name}.jsonl").write_text("\n".join(recs) + "\n")
            info[name] = {"file_name": f"{name}.jsonl", "formatting": "sharegpt"}
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return lf_folder(tmp_path_factory.mktemp("mix"))


def cfg(folder: Path, cache: Path, **kw) -> DatasetConfig:
    return DatasetConfig(dir=str(folder), names=list(NAMES), cache_dir=str(cache), cutoff_len=128, **kw)


def sources_of(out: Path, tokenizer) -> tuple[list[str], np.ndarray]:
    """The dataset of each prepared training row (from the name its prompt starts with), and its length."""
    train = datasets.load_from_disk(str(out / "train"))
    heads = tokenizer.batch_decode([ids[:40] for ids in train["input_ids"]])
    found = [next(n for n in NAMES if f"{n} question" in h) for h in heads]
    return found, np.asarray(train["length"])


# ------------------------------------------------------------------------------------------------ the arithmetic
def arrays(sizes: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sources = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    return sources, rng.integers(5, 200, len(sources))


def counts(indices: np.ndarray, sources: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(sources[indices], minlength=k)


def test_record_shares_are_exact_for_a_count() -> None:
    sources, lengths = arrays([5000, 3000, 2000])
    idx, rows = mix_indices(sources, lengths, NAMES, MixSpec((0.6, 0.3, 0.1), "records", "10000"), 42)
    assert counts(idx, sources, 3).tolist() == [6000, 3000, 1000]
    assert [(r["available"], r["used"]) for r in rows] == [(5000, 6000), (3000, 3000), (2000, 1000)]
    a = idx[sources[idx] == 0]
    assert np.bincount(a).max() == 2 and len(np.unique(a)) == 5000  # every alpha record once, 1000 of them twice
    assert len(np.unique(idx[sources[idx] == 2])) == 1000  # gamma down-sampled without repeats


@pytest.mark.parametrize("weights", [(0.6, 0.3, 0.1), (1, 1, 1), (7, 0, 2)])
@pytest.mark.parametrize("size", ["under", "over", "12345", "1.5x"])
def test_record_shares_within_a_record_for_every_size(weights, size) -> None:
    sources, lengths = arrays([5000, 3000, 2000])
    idx, _ = mix_indices(sources, lengths, NAMES, MixSpec(tuple(map(float, weights)), "records", size), 3)
    c = counts(idx, sources, 3)
    share = np.array(weights) / sum(weights)
    assert np.all(np.abs(c - share * c.sum()) <= 1.0), c
    if size == "12345":
        assert c.sum() == 12345
    if size == "1.5x":
        assert c.sum() == 15000
    used = [np.unique(idx[sources[idx] == i]) for i in range(3)]
    if size == "under":  # nothing repeated, and the dataset that runs out first is used whole
        assert len(np.unique(idx)) == len(idx)
        assert any(len(u) == n for u, n, w in zip(used, [5000, 3000, 2000], weights) if w)
    if size == "over":  # every weighted record used, and one dataset exactly once
        assert all(len(u) == n for u, n, w in zip(used, [5000, 3000, 2000], weights) if w)
        assert any(c[i] == n for i, n in enumerate([5000, 3000, 2000]) if weights[i])


@pytest.mark.parametrize("size", ["under", "over", "500000", "2x"])
def test_token_shares_within_one_percent(size: str) -> None:
    sources, lengths = arrays([5000, 3000, 2000])
    lengths = lengths * (1 + sources)  # beta's records twice as long, gamma's three times
    idx, rows = mix_indices(sources, lengths, NAMES, MixSpec((0.6, 0.3, 0.1), "tokens", size), 0)
    tokens = np.bincount(sources[idx], weights=lengths[idx], minlength=3)
    assert np.all(np.abs(tokens / tokens.sum() - [0.6, 0.3, 0.1]) < 0.01), tokens / tokens.sum()
    assert [r["tokens"] for r in rows] == tokens.astype(int).tolist()
    if size == "under":
        assert len(np.unique(idx)) == len(idx)


def test_without_weights_every_record_once_or_scaled_alike() -> None:
    sources, lengths = arrays([50, 30, 20])
    for size in ("under", "over"):
        idx, _ = mix_indices(sources, lengths, NAMES, MixSpec((), "records", size), 0)
        assert idx.tolist() == list(range(100))
    idx, _ = mix_indices(sources, lengths, NAMES, MixSpec((), "records", "2x"), 0)
    assert counts(idx, sources, 3).tolist() == [100, 60, 40]


def test_the_draw_depends_on_the_seed_and_the_dataset_alone() -> None:
    sources, lengths = arrays([500, 300, 200])
    spec = MixSpec((0.2, 0.3, 0.5), "records", "1000")
    a, _ = mix_indices(sources, lengths, NAMES, spec, 7)
    assert np.array_equal(a, mix_indices(sources, lengths, NAMES, spec, 7)[0])
    assert not np.array_equal(a, mix_indices(sources, lengths, NAMES, spec, 8)[0])
    # Another dataset's weight changes nothing in alpha's draw of the same size.
    b, _ = mix_indices(sources, lengths, NAMES, MixSpec((0.2, 0.5, 0.3), "records", "1000"), 7)
    assert np.array_equal(a[sources[a] == 0], b[sources[b] == 0])


def test_a_weighted_dataset_without_records_is_an_error() -> None:
    sources, lengths = arrays([50, 0, 20])
    with pytest.raises(ValueError, match="'beta' in dataset.names have a weight but no training record"):
        mix_indices(sources, lengths, NAMES, MixSpec((1, 1, 1), "records", "under"), 0)
    idx, _ = mix_indices(sources, lengths, NAMES, MixSpec((1, 0, 1), "records", "under"), 0)
    assert counts(idx, sources, 3).tolist() == [20, 0, 20]


# ------------------------------------------------------------------------------------------------ LLaMA-Factory
@pytest.mark.parametrize("lf,native", [
    ({"mix_strategy": "interleave_under", "interleave_probs": "0.6,0.3,0.1"},
     {"weights": [0.6, 0.3, 0.1], "mix_size": "under"}),
    ({"mix_strategy": "interleave_over", "interleave_probs": [0.6, 0.3, 0.1]},
     {"weights": [0.6, 0.3, 0.1], "mix_size": "over"}),
    ({"mix_strategy": "interleave_under"}, {"weights": [1, 1, 1]}),
    ({"mix_strategy": "interleave_once"}, {}),
    ({"mix_strategy": "concat"}, {}),
])
def test_llamafactory_spelling_resolves_to_the_native_mix(lf: dict, native: dict, tmp_path: Path) -> None:
    a, b = cfg(tmp_path, tmp_path, **lf), cfg(tmp_path, tmp_path, **native)
    assert problems(a) == [] and problems(b) == []
    assert resolve(a).key() == resolve(b).key()


# ------------------------------------------------------------------------------------------------ prepare
def test_ten_thousand_record_mix_end_to_end(folder: Path, tmp_path: Path, tokenizer) -> None:
    c = cfg(folder, tmp_path / "a", weights=[0.6, 0.3, 0.1], mix_size="10000", val_size=100)
    out, stats, hit = prepare(c, template(), tokenizer, TOKENIZER_DIR, 42)
    assert not hit and stats.records == 10000 and stats.eval_records == 100 and stats.used == 10000
    found, lengths = sources_of(out, tokenizer)
    shares = {n: found.count(n) / len(found) for n in NAMES}
    assert all(abs(shares[n] - w) <= 0.01 for n, w in zip(NAMES, c.weights)), shares
    rows = {r["name"]: r for r in stats.mix["datasets"]}
    assert sum(r["available"] for r in rows.values()) == 9900  # the 100 held out are not mixed
    assert [rows[n]["used"] for n in NAMES] == [6000, 3000, 1000]
    assert stats.tokens == int(lengths.sum()) == sum(r["tokens"] for r in rows.values())
    # Packing works on the mixed set: every mixed row is placed exactly once.
    plan = load_plan(plan_path(out, "train"))
    assert sorted(plan.indices.tolist()) == list(range(10000))
    # The held-out records are none of the trained ones.
    evals = datasets.load_from_disk(str(out / "eval"))
    trained = {tuple(x) for x in datasets.load_from_disk(str(out / "train"))["input_ids"]}
    assert not trained & {tuple(x) for x in evals["input_ids"]}
    text = report(out, stats, tokenizer, 128, samples=0)
    assert "mix (weights 0.6/0.3/0.1 of the records, size 10000); repeats = used / available:" in text
    alpha_line = next(line for line in text.splitlines() if line.strip().startswith("alpha"))
    assert alpha_line.split()[:5] == ["alpha", "60.0%", f"{rows['alpha']['available']:,}", "6,000",
                                      f"{6000 / rows['alpha']['available']:.2f}×"]

    # The same mix again, in another cache: identical rows and row plan.
    out2, _, _ = prepare(dataclasses.replace(c, cache_dir=str(tmp_path / "b")), template(), tokenizer,
                         TOKENIZER_DIR, 42)
    assert datasets.load_from_disk(str(out2 / "train"))[:] == datasets.load_from_disk(str(out / "train"))[:]
    assert np.array_equal(load_plan(plan_path(out2, "train")).indices, plan.indices)


def test_llamafactory_interleave_config_gives_the_same_prepared_mix(folder: Path, tmp_path: Path, tokenizer) -> None:
    native = cfg(folder, tmp_path, weights=[0.6, 0.3, 0.1], mix_size="under")
    lf = cfg(folder, tmp_path, mix_strategy="interleave_under", interleave_probs="0.6,0.3,0.1")
    out, stats, hit = prepare(native, template(), tokenizer, TOKENIZER_DIR, 0)
    out_lf, stats_lf, hit_lf = prepare(lf, template(), tokenizer, TOKENIZER_DIR, 0)
    assert (hit, hit_lf) == (False, True) and out == out_lf and stats == stats_lf
    # interleave_under: alpha (5000 records for 60 %) runs out first and is used whole; no record repeats.
    assert [r["used"] for r in stats.mix["datasets"]] == [5000, 2500, 833]


def test_token_mix_end_to_end(folder: Path, tmp_path: Path, tokenizer) -> None:
    c = cfg(folder, tmp_path, weights=[0.2, 0.3, 0.5], mix_by="tokens", mix_size="over")
    out, stats, _ = prepare(c, template(), tokenizer, TOKENIZER_DIR, 0)
    found, lengths = sources_of(out, tokenizer)
    tokens = {n: int(lengths[[f == n for f in found]].sum()) for n in NAMES}
    total = sum(tokens.values())
    assert all(abs(tokens[n] / total - w) <= 0.01 for n, w in zip(NAMES, c.weights)), tokens
    assert {r["name"]: r["tokens"] for r in stats.mix["datasets"]} == tokens


def test_world_size_does_not_enter_the_mix(folder: Path, tmp_path: Path, capsys) -> None:
    """The mix is prepared by the launcher, before packing: other backends and worker counts reuse the same data."""
    from launcher.inspect_data import main

    common = ["-n", "0", f"dataset.dir={folder}", f"dataset.names=[{','.join(NAMES)}]", "dataset.weights=[6,3,1]",
              "dataset.mix_size=5000", f"dataset.cache_dir={tmp_path}"]
    assert main([*common, "backend=single"]) == 0
    single = capsys.readouterr()
    assert main([*common, "backend=deepspeed_zero3", "launcher.nproc_per_node=2"]) == 0
    two = capsys.readouterr()
    assert main([*common, "backend=fsdp", "launcher.nproc_per_node=4", "launcher.nnodes=2",
                 "launcher.master_port=29500"]) == 0
    eight = capsys.readouterr()
    assert "reused cached data" in two.err and "reused cached data" in eight.err
    assert single.out == two.out == eight.out and "alpha" in single.out and "3,000" in single.out


# ------------------------------------------------------------------------------------------------ bad settings
BAD = {
    "weights count": (["dataset.weights=[0.6,0.4]"],
                      "dataset.weights has 2 value(s) for the 3 dataset(s) of dataset.names (alpha, beta, gamma): "
                      "give one weight per name, in the same order, e.g. dataset.weights=[1,1,1]."),
    "negative": (["dataset.weights=[0.6,-0.1,0.5]"],
                 "dataset.weights has negative weights (-0.1 for 'beta'): a weight is a share, 0 or more."),
    "all zero": (["dataset.weights=[0,0,0]"],
                 "dataset.weights are all 0: give at least one dataset a positive weight."),
    "unknown name": (["dataset.names=[alpha,betta,gamma]", "dataset.weights=[1,1,1]"],
                     "dataset.names: 'betta' not in {dir}/dataset_info.json, which has alpha, beta, gamma. Fix "
                     "dataset.names (and dataset.weights with it) or add the entry."),
    "size": (["dataset.mix_size=lots"], "dataset.mix_size='lots' is not a size: use under (repeat nothing), over"),
    "mix_by": (["dataset.mix_by=bytes"], "dataset.mix_by='bytes' is not one of records, tokens."),
    "both spellings": (["dataset.weights=[1,1,1]", "dataset.mix_strategy=interleave_over"],
                       "dataset.mix_strategy/interleave_probs (LLaMA-Factory's spelling) and dataset.weights/mix_size "
                       "say the same thing: keep one"),
    "probs without interleave": (["dataset.interleave_probs=[0.5,0.3,0.2]"],
                                 "dataset.interleave_probs is given but dataset.mix_strategy=concat does not mix by "
                                 "probabilities: set dataset.mix_strategy=interleave_under"),
    "probs count": (["dataset.mix_strategy=interleave_under", "dataset.interleave_probs=[0.5,0.5]"],
                    "dataset.interleave_probs has 2 value(s) for the 3 dataset(s)"),
    "strategy": (["dataset.mix_strategy=interleave"], "dataset.mix_strategy='interleave' is not one of concat, "
                                                      "interleave_under, interleave_over, interleave_once."),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_mix_settings_fail_validation_naming_the_key(case: str, folder: Path) -> None:
    overrides, message = BAD[case]
    names = [] if any(o.startswith("dataset.names=") for o in overrides) else [f"dataset.names=[{','.join(NAMES)}]"]
    obj = to_object(_compose(f"dataset.dir={folder}", *names, *overrides))
    with pytest.raises(ConfigError) as err:
        validate(obj)
    assert message.format(dir=folder.resolve()) in str(err.value)


def test_bad_mix_stops_the_launcher_before_anything_starts(folder: Path, tmp_path: Path) -> None:
    r = run_launcher(f"dataset.dir={folder}", "dataset.names=[alpha,beta]", "dataset.weights=[1,-1]",
                     f"output_dir={tmp_path / 'out'}", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "dataset.weights has negative weights (-1 for 'beta')" in r.stderr
    assert not any((tmp_path / "out").rglob("config.yaml"))


def test_eval_datasets_are_never_mixed(folder: Path) -> None:
    """eval.datasets are evaluated whole; only dataset.names are mixed (the launcher clears the mix for them)."""
    obj = to_object(_compose(f"dataset.dir={folder}", "dataset.names=[alpha,beta]", "dataset.weights=[3,1]",
                             "eval.datasets=[gamma]"))
    validate(obj)
    obj.eval.datasets = ["gamma", "delta"]
    with pytest.raises(ConfigError, match="eval.datasets: 'delta' not in"):
        validate(obj)


@pytest.mark.slow
def test_training_on_a_mix(folder: Path, tmp_path: Path) -> None:
    r = run_launcher(f"dataset.dir={folder}", f"dataset.names=[{','.join(NAMES)}]", "dataset.weights=[1,1,2]",
                     "dataset.mix_size=400", "dataset.cutoff_len=256", "backend=single", "train.max_steps=2",
                     f"dataset.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data: 400 records for training" in r.stderr and "mix (weights 0.25/0.25/0.5 of the records" in r.stderr
    (report_file,) = (tmp_path / "out").rglob("data_report.txt")
    assert "gamma" in report_file.read_text() and "done: 2 steps" in r.stderr


def test_root_defaults_are_unmixed() -> None:
    obj = to_object(_compose())
    assert resolve(obj.dataset) == MixSpec((), "records", "under") and resolve(obj.dataset).identity
