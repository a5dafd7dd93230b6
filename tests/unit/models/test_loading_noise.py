"""A model load or save prints neither transformers' per-model bars nor its v6 renaming warnings."""

import warnings

from transformers import AutoModelForCausalLM

from lmpipeline.models.loading import enable_gradient_checkpointing, hide_loading_noise


def test_model_load_save_and_checkpointing_are_quiet(tiny_model, tmp_path, capfd):
    hide_loading_noise()  # pytest resets warning filters per test; the import-time call is what users get
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        hide_loading_noise()
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        enable_gradient_checkpointing(model)
        model.save_pretrained(tmp_path / "saved")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err
    assert not [w for w in caught if "will be removed in v6" in str(w.message)], [str(w.message) for w in caught]
