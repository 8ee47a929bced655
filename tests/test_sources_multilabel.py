"""Multilabel findings, patient-grouped stratified splits and ``data.where`` on CSV manifests
(the NIH ChestX-ray14 form), on small synthetic manifests and, when present, on the real one."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder

from raypipe.config import ConfigError, load_config
from raypipe.data.sources import (
    DatasetSplit,
    DataSourceError,
    Record,
    discover,
    label_array,
    label_counts,
    stratified_split,
)

HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"


def _discover(*overrides: str) -> DatasetSplit:
    return discover(load_config(None, list(overrides)).data)


def write_manifest(folder: Path, rows: list[tuple[str, str, str, str]],
                   name: str = "Data_Entry.csv") -> Path:
    """An NIH-form manifest of ``(findings, patient, age, view)`` rows, with one small file of
    distinct bytes per row under ``folder/images/`` (found by name, as in the NIH download)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = [HEADER]
    for i, (findings, patient, age, view) in enumerate(rows):
        file = f"{int(patient):08d}_{i:03d}.png"
        (images / file).write_bytes(file.encode())
        lines.append(f"{file},{findings},{i},{patient},{age},M,{view}")
    csv = folder / name
    csv.write_text("\n".join(lines) + "\n")
    return csv


FINDINGS = ["Atelectasis", "Effusion", "Hernia", "Mass"]


def synthetic_rows(n_patients: int = 120, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """Patients with 1-6 films each; Hernia in a few patients only, No Finding in about half."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(1, n_patients + 1):
        hernia = p % 20 == 0
        for _ in range(int(rng.integers(1, 7))):
            found = [f for f, q in zip(FINDINGS, (0.2, 0.3, 0.0, 0.1), strict=True)
                     if rng.random() < q]
            if hernia and rng.random() < 0.7:
                found.append("Hernia")
            rows.append(("|".join(sorted(found)) or "No Finding", str(p),
                         str(int(rng.integers(1, 90))), "PA" if rng.random() < 0.6 else "AP"))
    return rows


def _truth(rows) -> dict[str, tuple[set[str], str, int, str]]:
    """file -> (findings, patient, age, view) of a manifest written by :func:`write_manifest`."""
    return {f"{int(p):08d}_{i:03d}.png": (set(f.split("|")) - {"No Finding"}, p, int(a), v)
            for i, (f, p, a, v) in enumerate(rows)}


# ---------------------------------------------------------------- multilabel labels


def test_joined_findings_make_a_multilabel_task_said_in_the_log(tmp_path: Path, caplog) -> None:
    rows = synthetic_rows()
    csv = write_manifest(tmp_path, rows)
    with caplog.at_level(logging.INFO, logger="raypipe"):
        split = _discover(f"data.manifest={csv}")
    assert split.task == "multilabel" and split.multilabel
    assert split.class_names == FINDINGS  # every finding found, sorted; No Finding is none
    truth = _truth(rows)
    for r in split.train + split.val:
        assert r.label == tuple(int(f in truth[r.key][0]) for f in FINDINGS)
        assert r.group == truth[r.key][1]
    assert any("data.task=auto: multilabel" in m and "'|'" in m and "Finding Labels" in m
               for m in caplog.messages)
    # the array a batch carries: float32 (N, K) multi-hot rows
    y = split.label_array(split.val)
    assert y.dtype == np.float32 and y.shape == (len(split.val), 4)
    assert y.tolist() == [list(r.label) for r in split.val]
    # records with the same findings share one tuple: 100,000 rows hold a few hundred
    assert len({id(r.label) for r in split.train}) <= 2 ** len(FINDINGS)
    counts = split.counts()
    assert counts["task"] == "multilabel"
    for side, records in (("train", split.train), ("val", split.val)):
        assert counts[side] == {f: sum(f in truth[r.key][0] for r in records) for f in FINDINGS}
        assert counts[f"no_finding_{side}"] == sum(not truth[r.key][0] for r in records)
    assert counts["prevalence_train"]["Effusion"] == pytest.approx(
        counts["train"]["Effusion"] / len(split.train))
    assert counts["group_by"] == "column 'Patient ID'" and counts["groups_on_both_sides"] == 0
    text = split.describe()
    assert text.startswith(f"multilabel, 4 findings; train {len(split.train)} files of "
                           f"{counts['train_groups']} groups (Atelectasis ")
    assert "grouped by column 'Patient ID'" in text


def test_findings_pick_a_subset_and_their_order(tmp_path: Path) -> None:
    rows = synthetic_rows()
    csv = write_manifest(tmp_path, rows)
    split = _discover(f"data.manifest={csv}", "data.findings=[Mass, Effusion]")
    assert split.class_names == ["Mass", "Effusion"]
    truth = _truth(rows)
    for r in split.train + split.val:
        assert r.label == (int("Mass" in truth[r.key][0]), int("Effusion" in truth[r.key][0]))
    assert split.train_label_counts() == label_counts(split.train, 2)
    with pytest.raises(DataSourceError, match=r"data.findings names \['Efusion'\].*did you mean "
                                              r"'Effusion'.*Atelectasis \(\d+\), Effusion"):
        _discover(f"data.manifest={csv}", "data.findings=[Efusion]")


def test_one_finding_against_the_rest_stays_binary(tmp_path: Path) -> None:
    rows = synthetic_rows()
    csv = write_manifest(tmp_path, rows)
    split = _discover(f"data.manifest={csv}", "data.positive_finding=Effusion")
    assert split.task == "binary" and split.class_names == ["no_Effusion", "Effusion"]
    truth = _truth(rows)
    assert all(r.label == int("Effusion" in truth[r.key][0]) for r in split.train + split.val)
    y = split.label_array(split.train)
    assert y.dtype == np.int64 and y.shape == (len(split.train),)
    assert _patients_on_both_sides(split) == set()  # grouped by patient by default


def test_task_can_be_forced_and_wrong_combinations_fail(tmp_path: Path) -> None:
    csv = write_manifest(tmp_path, synthetic_rows(40))
    # multiclass: each joined label string is one class (the pre-multilabel reading)
    split = _discover(f"data.manifest={csv}", "data.task=multiclass")
    assert split.task == "multiclass" and "Atelectasis|Effusion" in split.class_names
    with pytest.raises(DataSourceError, match="data.task=binary.*classes"):
        _discover(f"data.manifest={csv}", "data.task=binary")
    with pytest.raises(ConfigError, match="positive_finding='Effusion' makes the task binary"):
        load_config(None, ["data.positive_finding=Effusion", "data.task=multilabel"])
    with pytest.raises(ConfigError, match="data.findings.*data.task multilabel"):
        load_config(None, ["data.findings=[Effusion]", "data.task=multiclass"])
    root = make_image_folder(tmp_path / "folders", {"a": 3, "b": 3})
    with pytest.raises(DataSourceError, match="needs a CSV manifest"):
        _discover(f"data.root={root}", "data.task=multilabel")


def test_an_empty_label_cell_is_an_error_not_silently_no_finding(tmp_path: Path) -> None:
    rows = synthetic_rows(30)
    rows[3] = ("", *rows[3][1:])
    csv = write_manifest(tmp_path, rows)
    with pytest.raises(DataSourceError, match="1 row.*empty 'Finding Labels'.*No Finding"):
        _discover(f"data.manifest={csv}")
    # and the fix the message offers works
    split = _discover(f"data.manifest={csv}", "data.where=Finding Labels != ''")
    assert len(split.train) + len(split.val) == len(rows) - 1


def test_a_validation_manifest_takes_the_training_findings(tmp_path: Path, caplog) -> None:
    train_csv = write_manifest(tmp_path / "train", synthetic_rows(60, seed=1))
    val_rows = [("Effusion|Pneumonia", "900", "40", "PA"), ("No Finding", "901", "40", "PA"),
                ("Mass", "1", "30", "AP")]  # patient 1 has training films too
    val_csv = write_manifest(tmp_path / "val", val_rows)
    with caplog.at_level(logging.WARNING, logger="raypipe"):
        split = _discover(f"data.manifest={train_csv}", f"data.val_manifest={val_csv}")
    assert split.class_names == FINDINGS and split.task == "multilabel"
    assert sorted(r.label for r in split.val) == [(0, 0, 0, 0), (0, 0, 0, 1), (0, 1, 0, 0)]
    assert any("['Pneumonia']" in m and "ignored" in m for m in caplog.messages)
    # a given validation set is not split by raypipe, so it can share patients: said, not hidden
    assert split.counts()["groups_on_both_sides"] == 1
    assert any("1 group(s) (column 'Patient ID') have files on both sides" in m
               for m in caplog.messages)


def test_limit_takes_a_stratified_subset_of_multilabel_files(tmp_path: Path) -> None:
    csv = write_manifest(tmp_path, synthetic_rows(200))
    split = _discover(f"data.manifest={csv}", "data.limit=40")
    assert len(split.train) == 40 and len(split.val) == 10
    assert split.task == "multilabel" and _patients_on_both_sides(split) == set()
    assert all(label_counts(split.train, 4)[i] > 0 for i in (0, 1, 3))


# ---------------------------------------------------------------- groups


def _patients_on_both_sides(split: DatasetSplit) -> set[str]:
    return {r.group for r in split.train} & {r.group for r in split.val}


def test_patients_never_on_both_sides_and_findings_split_in_proportion(tmp_path: Path) -> None:
    rows = synthetic_rows(300, seed=2)
    csv = write_manifest(tmp_path, rows)
    split = _discover(f"data.manifest={csv}", "data.val_fraction=0.25")
    assert _patients_on_both_sides(split) == set()
    assert len(split.train) + len(split.val) == len(rows)
    counts = split.counts()
    for f in FINDINGS:  # every finding on both sides, near a quarter of its files in validation
        total = counts["train"][f] + counts["val"][f]
        assert counts["train"][f] > 0 and counts["val"][f] > 0, f
        assert abs(counts["val"][f] / total - 0.25) < 0.06, (f, counts)
    assert abs(len(split.val) / len(rows) - 0.25) < 0.02
    # without grouping, the same data does put patients on both sides: the test can fail
    loose = _discover(f"data.manifest={csv}", "data.val_fraction=0.25", "data.group_column=null")
    assert loose.group_by is None and _patients_on_both_sides(loose)
    assert "group_by" not in loose.counts()


def test_the_group_column_can_be_named_and_a_wrong_one_is_named_back(tmp_path: Path) -> None:
    rows = synthetic_rows(80)
    csv = write_manifest(tmp_path, rows)
    split = _discover(f"data.manifest={csv}", "data.group_column=Patient Gender")
    assert split.group_by == "column 'Patient Gender'"  # one group: 'M' (all files one side)
    assert {r.group for r in split.train + split.val} == {"M"}
    with pytest.raises(DataSourceError, match="'Patient Idx' is not a column.*did you mean "
                                              "'Patient ID'"):
        _discover(f"data.manifest={csv}", "data.group_column=Patient Idx")


def test_group_pattern_keeps_each_person_of_a_folder_on_one_side(tmp_path: Path) -> None:
    """Kermany's pneumonia files are ``personN_<kind>_M``; normal ones match no pattern and are
    each their own group."""
    root = tmp_path / "kermany"
    for cls, names in {"PNEUMONIA": [f"person{p}_{k}_{m}.png" for p in range(1, 31)
                                     for k, m in (("bacteria", 1), ("virus", 2), ("bacteria", 3))],
                       "NORMAL": [f"IM-{i:04d}-0001.png" for i in range(40)]}.items():
        (root / cls).mkdir(parents=True)
        for name in names:
            (root / cls / name).write_bytes(name.encode())
    split = _discover(f"data.root={root}", r"data.group_pattern=person(\d+)_")
    groups = {r.key: r.group for r in split.train + split.val}
    assert groups["PNEUMONIA/person12_virus_2.png"] == "12"
    assert groups["NORMAL/IM-0003-0001.png"] is None
    assert _patients_on_both_sides(split) - {None} == set()
    assert split.group_by == r"file-name pattern 'person(\d+)_'"
    assert split.counts()["val"]["PNEUMONIA"] in (18, 15, 21)  # whole persons of 3 films
    assert 6 <= split.counts()["val"]["NORMAL"] <= 10
    loose = _discover(f"data.root={root}")
    assert {r.key.split("_")[0] for r in loose.train} & {r.key.split("_")[0] for r in loose.val}
    with pytest.raises(ConfigError, match="no \\(...\\) group"):
        load_config(None, ["data.group_pattern=person"])


def _old_split(records: list[Record], fraction: float, seed: int) -> list[str]:
    """The per-class hash split as it was before groups: the validation keys."""
    def h(key: str) -> int:
        return int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode()).digest()[:8], "big")

    val = []
    for label in sorted({r.label for r in records}):
        group = sorted((r for r in records if r.label == label), key=lambda r: h(r.key))
        k = min(max(round(len(group) * fraction), 1), len(group) - 1) if len(group) >= 2 else 0
        val += [r.key for r in group[:k]]
    return sorted(val)


@pytest.mark.parametrize("seed", [0, 7])
def test_ungrouped_single_label_data_splits_exactly_as_before(seed: int) -> None:
    rng = np.random.default_rng(seed)
    records = [Record(f"/d/{i}.png", int(rng.choice(3, p=[0.7, 0.25, 0.05])), f"f{i}.png")
               for i in range(700)]
    _, val = stratified_split(records, 0.2, seed)
    assert [r.key for r in val] == _old_split(records, 0.2, seed)


def _grouped_records(n_patients: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_patients):
        rare = p % 15 == 0
        for j in range(int(rng.integers(1, 5))):
            label = tuple(int(x) for x in (rng.random() < 0.3, rng.random() < 0.1,
                                           rare and rng.random() < 0.8))
            out.append(Record(f"/d/{p}_{j}.png", label, f"{p}_{j}.png", None, f"p{p}"))
    return out


def test_grouped_split_is_deterministic_order_free_and_seeded() -> None:
    records = _grouped_records(400)
    train, val = stratified_split(records, 0.2, 3)
    assert stratified_split(records, 0.2, 3) == (train, val)
    shuffled = [records[i] for i in np.random.default_rng(1).permutation(len(records))]
    assert stratified_split(shuffled, 0.2, 3) == (train, val)  # manifest row order is no input
    assert stratified_split(records, 0.2, 4)[1] != val
    assert {r.group for r in train}.isdisjoint({r.group for r in val})


def test_adding_patients_moves_few_old_patients() -> None:
    """Hash order within each stratum: new patients push out only patients at the margin."""
    before = _grouped_records(400)
    after = before + [Record(f"/d/n{p}.png", (0, 0, 0), f"n{p}.png", None, f"n{p}")
                      for p in range(40)]  # 10 % more patients, no finding
    val_before = {r.group for r in stratified_split(before, 0.2, 3)[1]}
    val_after = {r.group for r in stratified_split(after, 0.2, 3)[1]}
    new_in_val = {g for g in val_after if g.startswith("n")}
    moved = val_before - val_after
    assert 0 < len(new_in_val) and len(moved) <= len(new_in_val) + 3
    # the findings' strata did not move at all: only patients without findings changed side
    assert all(not any(r.label) for r in before if r.group in moved)


def test_label_helpers_work_for_both_kinds_of_label() -> None:
    single = [Record("/a", 1, "a"), Record("/b", 0, "b"), Record("/c", 1, "c")]
    assert label_array(single).tolist() == [1, 0, 1] and label_counts(single, 3) == [1, 2, 0]
    multi = [Record("/a", (1, 0), "a"), Record("/b", (1, 1), "b")]
    assert label_array(multi, 2).tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert label_counts(multi, 2) == [2, 1]
    assert label_array([], 2, multilabel=True).shape == (0, 2)
    split = DatasetSplit(None, ["x", "y"], multi, [Record("/c", (0, 1), "c")], "src")
    assert split.task == "multilabel" and split.undefined_auc() == ["x", "y"]


# ---------------------------------------------------------------- data.where


def test_where_filters_rows_before_the_split(tmp_path: Path, caplog) -> None:
    rows = synthetic_rows(150, seed=3)
    csv = write_manifest(tmp_path, rows)
    truth = _truth(rows)

    def kept(*conditions: str) -> set[str]:
        split = _discover(f"data.manifest={csv}", f"data.where={json.dumps(conditions)}")
        return {r.key for r in split.train + split.val}

    with caplog.at_level(logging.INFO, logger="raypipe"):
        pa_only = kept("View Position == PA")
    assert pa_only == {k for k, t in truth.items() if t[3] == "PA"} and pa_only != set(truth)
    assert any("data.where keeps" in m for m in caplog.messages)
    assert kept("View Position != PA") == set(truth) - pa_only
    assert kept("Patient Age <= 18") == {k for k, t in truth.items() if t[2] <= 18}
    assert kept("Patient Age > 60", "View Position == 'AP'") == {
        k for k, t in truth.items() if t[2] > 60 and t[3] == "AP"}
    assert kept("Patient Age >= 070") == {k for k, t in truth.items() if t[2] >= 70}  # numeric
    assert kept("Patient ID in [1, 2, 3]") == {k for k, t in truth.items() if t[1] in ("1", "2", "3")}
    assert kept("Patient ID not in [1]") == {k for k, t in truth.items() if t[1] != "1"}
    assert kept("View Position < B") == set(truth) - pa_only  # text compares as text
    # rows of one finding each are still multilabel: the column's form decides, not the rows kept
    single = _discover(f"data.manifest={csv}", "data.where=Finding Labels in [Mass, No Finding]")
    assert single.task == "multilabel" and single.class_names == ["Mass"]  # of the rows kept
    assert {r.label for r in single.train} == {(0,), (1,)}


def test_where_errors_name_the_column_and_the_values(tmp_path: Path) -> None:
    csv = write_manifest(tmp_path, synthetic_rows(50))
    with pytest.raises(DataSourceError, match="no column 'View Positon'.*did you mean "
                                              "'View Position'"):
        _discover(f"data.manifest={csv}", "data.where=View Positon == PA")
    with pytest.raises(DataSourceError, match="'View Position == LL' matches no row.*2 distinct "
                                              "values: 'PA' \\(\\d+\\), 'AP'"):
        _discover(f"data.manifest={csv}", "data.where=View Position == LL")
    with pytest.raises(DataSourceError, match="matches no row.*numbers from 1 to"):
        _discover(f"data.manifest={csv}", "data.where=Patient Age > 500")
    with pytest.raises(DataSourceError, match="together match no row"):
        _discover(f"data.manifest={csv}", "data.where=[Patient Age > 80, Patient Age < 5]")
    with pytest.raises(ConfigError, match="is not '<column> <op> <value>'"):
        load_config(None, ["data.where=View Position = PA"])
    root = make_image_folder(tmp_path / "folders", {"a": 3, "b": 3})
    with pytest.raises(DataSourceError, match="data.where needs a CSV manifest"):
        _discover(f"data.root={root}", "data.where=x == 1")


# ---------------------------------------------------------------- the real NIH manifest

NIH = "nih-chestxray14/Data_Entry_2017_v2020.csv.gz"


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    """The real manifest, with an empty stand-in file for each of its 112,120 names (the
    listing, the label parsing and the split are real; no pixels are read)."""
    from conftest import SHARED_DATA

    if not (SHARED_DATA / NIH).is_file():
        pytest.skip(f"{SHARED_DATA / NIH} not present (real-data samples are optional)")
    import pandas as pd

    table = pd.read_csv(SHARED_DATA / NIH, dtype=str, keep_default_na=False)
    images = tmp_path_factory.mktemp("nih") / "images_001" / "images"
    images.mkdir(parents=True)
    for name in table["Image Index"]:
        os.close(os.open(images / name, os.O_CREAT | os.O_WRONLY, 0o644))
    return SHARED_DATA / NIH, images.parent.parent, table.set_index("Image Index")


def test_real_manifest_patient_split(nih) -> None:
    csv, root, table = nih
    split = _discover(f"data.manifest={csv}", f"data.root={root}")
    assert split.task == "multilabel" and len(split.class_names) == 14
    assert "No Finding" not in split.class_names and not split.skipped
    assert len(split.train) + len(split.val) == 112_120
    assert {r.group for r in split.train} | {r.group for r in split.val} == set(
        table["Patient ID"])  # all 30,805 patients
    assert len(set(table["Patient ID"])) == 30_805
    assert _patients_on_both_sides(split) == set()
    assert all(table.at[r.key, "Patient ID"] == r.group for r in split.val[::97])
    counts = split.counts()
    assert counts["train"]["Hernia"] + counts["val"]["Hernia"] == 227
    assert counts["train"]["Effusion"] + counts["val"]["Effusion"] == 13_317
    for f in split.class_names:  # every finding on both sides, a fifth of it in validation
        total = counts["train"][f] + counts["val"][f]
        assert abs(counts["val"][f] / total - 0.2) < 0.01, (f, counts["val"][f], total)
    assert abs(len(split.val) / 112_120 - 0.2) < 0.001
    assert split.undefined_auc() == []
    # the same split again, from the same records in another order
    everything = split.train + split.val
    again = stratified_split(everything[::-1], 0.2, 0)
    assert [r.key for r in again[1]] == [r.key for r in split.val]


def test_real_manifest_filtered_to_pa_films_and_made_binary(nih) -> None:
    csv, root, table = nih
    split = _discover(f"data.manifest={csv}", f"data.root={root}",
                      "data.where=View Position == PA", "data.positive_finding=Effusion")
    films = split.train + split.val
    assert len(films) == int((table["View Position"] == "PA").sum()) == 67_310
    assert {table.at[r.key, "View Position"] for r in films[::50]} == {"PA"}
    assert split.class_names == ["no_Effusion", "Effusion"]
    effusion = table["Finding Labels"].str.split("|").map(lambda f: "Effusion" in f)
    assert sum(r.label for r in films) == int(effusion[table["View Position"] == "PA"].sum())
    assert _patients_on_both_sides(split) == set()
    counts = split.counts()
    assert abs(counts["val"]["Effusion"] / (counts["val"]["Effusion"] + counts["train"]["Effusion"])
               - 0.2) < 0.01
