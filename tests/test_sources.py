"""Listing, labelling and splitting: folder-per-class and CSV manifests (NIH ChestX-ray14 form),
a seeded stratified split that stays put when files are added."""

from __future__ import annotations

from pathlib import Path

from conftest import make_image_folder

from raypipe.config import load_config
from raypipe.data.sources import Record, discover, stratified_split


def _discover(*overrides: str):
    return discover(load_config(None, list(overrides)).data)


def test_folder_per_class(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "r", {"dogs": 10, "cats": 5})
    (root / "cats" / "nested").mkdir()
    (root / "cats" / "nested" / "x.png").write_bytes((root / "cats" / "000.png").read_bytes())
    (root / "dogs" / ".hidden.png").write_bytes(b"")
    split = _discover(f"data.root={root}", "data.val_fraction=0.2")
    assert split.class_names == ["cats", "dogs"]  # sorted: labels do not depend on listing order
    everything = split.train + split.val
    assert len(everything) == 16 and len({r.key for r in everything}) == 16
    assert "cats/nested/x.png" in {r.key for r in everything}
    for r in everything:
        assert r.label == split.class_names.index(r.key.split("/")[0])
        assert Path(r.path).is_file() and r.size == Path(r.path).stat().st_size
    assert split.counts()["val"] == {"cats": 1, "dogs": 2}
    val_keys = {r.key for r in split.val}
    crossing = ("cats/000.png" in val_keys) != ("cats/nested/x.png" in val_keys)
    assert split.counts()["train_val_duplicates"] == int(crossing)  # the nested byte-copy
    dup = "; 1 validation image(s) duplicate a training image" if crossing else ""
    assert split.describe() == f"2 classes; train 13 (cats 5, dogs 8), val 3 (cats 1, dogs 2){dup}"


def test_the_log_names_the_split_once_in_words(tmp_path: Path, caplog) -> None:
    root = make_image_folder(tmp_path / "r", {"a": 8, "b": 2})
    with caplog.at_level("INFO", logger="raypipe"):
        _discover(f"data.root={root}", "data.val_fraction=0.5")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "raypipe.data.sources"]
    assert line == f"dataset {root}: 2 classes; train 5 (a 4, b 1), val 5 (a 4, b 1)"


def test_class_names_fix_the_label_order(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "r", {"a": 4, "b": 4})
    split = _discover(f"data.root={root}", "data.class_names=[b, a]")
    assert split.class_names == ["b", "a"]
    assert all(r.label == (0 if r.key.startswith("b/") else 1) for r in split.train + split.val)


def test_split_is_deterministic_stratified_and_disjoint(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "r", {"a": 40, "b": 10})
    one = _discover(f"data.root={root}", "data.val_fraction=0.2")
    two = _discover(f"data.root={root}", "data.val_fraction=0.2")
    assert [r.key for r in one.val] == [r.key for r in two.val]
    assert one.counts()["val"] == {"a": 8, "b": 2}
    assert not {r.key for r in one.train} & {r.key for r in one.val}
    other = _discover(f"data.root={root}", "data.val_fraction=0.2", "data.split_seed=1")
    assert [r.key for r in other.val] != [r.key for r in one.val]


def test_split_stable_when_files_are_added(tmp_path: Path) -> None:
    def recs(n: int) -> list[Record]:
        return [Record(f"/d/{c}/{i}.png", k, f"{c}/{i}.png") for k, c in enumerate("ab")
                for i in range(n)]

    _, val_before = stratified_split(recs(100), 0.2, seed=3)
    train_after, val_after = stratified_split(recs(110), 0.2, seed=3)
    assert stratified_split(recs(100), 0.2, seed=3)[1] == val_before  # deterministic
    before, after = {r.key for r in val_before}, {r.key for r in val_after}
    old = {r.key for r in recs(100)}
    new_in_val = after - old
    moved_out = before - after  # only new files with lower hashes can push old ones out
    moved_in = (after & old) - before  # only the growth of the validation share pulls files in
    assert len(moved_out) <= len(new_in_val)
    assert len(moved_in) <= 2 * (round(110 * 0.2) - round(100 * 0.2))
    assert len(before & after) >= len(before) - len(new_in_val)
    assert len(after) == 44 and {r.key for r in train_after}.isdisjoint(after)


def test_manifest_layout(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"neg": 6, "pos": 6})
    rows = [f"{c}/{i:03d}.png,{c}" for c in ("neg", "pos") for i in range(6)]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    split = _discover(f"data.manifest={tmp_path / 'm.csv'}", f"data.root={root}")
    assert split.class_names == ["neg", "pos"]
    assert len(split.train) + len(split.val) == 12 and not split.skipped
    # paths relative to the CSV's own folder when data.root is not given
    (root / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    assert len(_discover(f"data.manifest={root / 'm.csv'}").train) == len(split.train)


def test_nih_manifest_made_binary(tmp_path: Path) -> None:
    """``Image Index`` / ``Finding Labels`` with ``|``-separated findings; images in sub-folders
    (images_001/images/...) found by file name, as in the NIH download."""
    findings = ["No Finding", "Effusion", "Atelectasis|Effusion", "Infiltration",
                "Effusion|Mass", "Cardiomegaly", "No Finding", "Pleural_Thickening",
                "Effusion", "Nodule", "No Finding", "Atelectasis"]
    tmp = make_image_folder(tmp_path / "tmp", {"x": len(findings)})
    images = tmp_path / "nih" / "images_001" / "images"
    images.mkdir(parents=True)
    rows = []
    for i, f in enumerate(findings):
        name = f"{i:08d}_000.png"
        (tmp / "x" / f"{i:03d}.png").rename(images / name)
        rows.append(f"{name},{f},0,{i},50,M,PA")
    csv = tmp_path / "nih" / "Data_Entry_2017.csv"
    csv.write_text("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
                   "Patient Gender,View Position\n" + "\n".join(rows) + "\n")
    split = _discover(f"data.manifest={csv}", "data.positive_finding=Effusion",
                      "data.val_fraction=0.25")
    assert split.class_names == ["no_Effusion", "Effusion"]
    labels = {r.key: r.label for r in split.train + split.val}
    expected = {f"{i:08d}_000.png": int("Effusion" in f.split("|")) for i, f in enumerate(findings)}
    assert labels == expected
    assert sum(expected.values()) == 4
    assert {r.label for r in split.val} == {0, 1}


def test_shared_flowers_sample(shared_data: Path) -> None:
    root = shared_data / "flowers-sample"
    if not root.is_dir():
        return
    split = _discover(f"data.root={root}", "data.class_names=[daisy, roses]")
    assert split.class_names == ["daisy", "roses"]
    assert min(split.counts()["val"].values()) >= 1


