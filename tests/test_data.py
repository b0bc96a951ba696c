import pytest

from fdrl import data


def test_shipped_sets_and_text_files_through_tfds(tmp_path):
    assert {"chat", "biographies"} <= set(data.shipped_prompt_sets())
    chat = data.load_prompts("chat")
    assert len(chat) == 16 and "Tell me about your day." in chat
    path = tmp_path / "mine.txt"
    path.write_text("first prompt\n\nsecond prompt\n")
    assert sorted(data.load_prompts(str(path), data_dir=str(tmp_path / "tfds"))) == ["first prompt", "second prompt"]
    assert len(data.load_prompts("chat", limit=3)) == 3


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a shipped set"):
        data.load_prompts("no_such_dataset_xyz", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no prompt file"):
        data.load_prompts(str(tmp_path / "missing.txt"))
