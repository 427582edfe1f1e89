import pytest

from pipeline.config import PACKAGED_CONFIGS, available_datasets, load_config, load_config_file
from pipeline.errors import ConfigError


def test_packaged_mnist_config_is_valid():
    cfg = load_config("mnist")
    assert cfg.kind == "idx"
    assert set(cfg.sources) == {"train_images", "train_labels", "test_images", "test_labels"}
    assert all(s.sha256 and s.md5 for s in cfg.sources.values())
    assert "mnist" in available_datasets()


def test_user_config_dir_wins(tiny_mnist):
    assert load_config("tinymnist").forest.n_trees == (2, 4)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown dataset 'nope'.*known datasets: .*mnist"):
        load_config("nope")


def _edit(tiny_mnist, old, new):
    path = tiny_mnist["config"]
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


def test_unknown_key_names_file_and_key(tiny_mnist):
    path = _edit(tiny_mnist, "seed = 0", "seed = 0\nn_tress = 3")
    with pytest.raises(ConfigError, match=r"tinymnist\.toml: unknown key forest\.n_tress"):
        load_config_file(path)


def test_wrong_type_names_key_and_value(tiny_mnist):
    path = _edit(tiny_mnist, "k = 20", 'k = "twenty"')
    with pytest.raises(ConfigError, match=r"key exact\.k must be int, got str 'twenty'"):
        load_config_file(path)


def test_missing_checksum(tiny_mnist):
    text = tiny_mnist["config"].read_text()
    lines = [line for line in text.splitlines() if not line.startswith("sha256")]
    tiny_mnist["config"].write_text("\n".join(lines))
    with pytest.raises(ConfigError, match=r"sources\.\w+ has no checksum"):
        load_config_file(tiny_mnist["config"])


def test_bad_choice_and_unknown_section(tiny_mnist):
    path = _edit(tiny_mnist, 'metric = "euclidean"', 'metric = "cosine"')
    with pytest.raises(ConfigError, match=r"embed\.metric = 'cosine' is not one of"):
        load_config_file(path)
    path.write_text(path.read_text() + "\n[extras]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[extras\]"):
        load_config_file(path)


def test_invalid_toml(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[dataset\nname = 1")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config_file(path)


def test_cnn_embedding_needs_images_and_angular(tiny_mnist):
    path = _edit(tiny_mnist, 'metric = "euclidean"', 'model = "cnn"\nmetric = "euclidean"')
    with pytest.raises(ConfigError, match=r"embed\.model = 'cnn' gives unit vectors: set embed\.metric = 'angular'"):
        load_config_file(path)


def test_gate_must_name_an_evaluated_setting(tiny_mnist):
    path = tiny_mnist["config"]
    path.write_text(path.read_text() + "\n[gate]\nmin_recall = 0.9\nn_trees = 7\n")
    with pytest.raises(ConfigError, match=r"gate\.n_trees = 7 is not one of forest\.n_trees"):
        load_config_file(path)
    path.write_text(path.read_text().replace("n_trees = 7", "search_k = 123"))
    with pytest.raises(ConfigError, match=r"gate\.search_k = 123 is not one of evaluate\.search_k"):
        load_config_file(path)


def test_every_packaged_config_validates(monkeypatch):
    monkeypatch.delenv("GROVE_CONFIGS", raising=False)
    files = sorted(PACKAGED_CONFIGS.glob("*.toml"))
    assert len(files) >= 10 and available_datasets() == sorted(f.stem for f in files)
    for path in files:
        cfg = load_config(path.stem)
        assert cfg.path == str(path) and cfg.name == path.stem
        for src in cfg.sources.values():
            assert src.urls or cfg.dataset.mirror_subdir, path  # mirror-only sources name their folder
            assert all(not d or d == d.lower() for d in (src.sha256, src.md5))
