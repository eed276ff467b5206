"""fusionlib.models.vl_base: what ViLBERT (chapter 5) and UNITER (chapter 6) share.

The models' own behaviour is tested in test_vilbert.py and test_uniter.py;
here, that both use the same heads, names and loss rule, and the errors of
the shared functions.
"""

import pytest
import torch

from fusionlib.models import uniter, vilbert, vl_base
from fusionlib.models.vl_base import PretrainingOutput, pretraining_losses

VOCAB, CLASSES, D = 30, 6, 12


def models():
    torch.manual_seed(0)
    v = vilbert.ViLBERTForPretraining(
        vilbert.ViLBERTConfig.small(
            VOCAB,
            CLASSES,
            region_dim=D,
            text_hidden_size=16,
            text_num_heads=2,
            text_ffn_size=32,
            visual_hidden_size=16,
            visual_num_heads=2,
            visual_ffn_size=32,
            bi_hidden_size=16,
            bi_num_heads=2,
            max_text_len=10,
            itm_negatives="random",
        )
    )
    u = uniter.UniterForPretraining(
        uniter.UniterConfig(
            vocab_size=VOCAB,
            num_region_classes=CLASSES,
            region_dim=D,
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            max_text_len=10,
            itm_negatives="random",
        )
    )
    return v, u


def test_both_models_use_the_shared_heads_and_task_names():
    for model in models():
        assert isinstance(model.mlm_head, vl_base.TiedMLMHead)
        assert model.mlm_head.decoder.weight is model.encoder.text_embeddings.word_embeddings.weight
        assert isinstance(model.mrc_head, vl_base.RegionClassificationHead)
        assert isinstance(model.itm_head, vl_base.ITMHead)
    assert set(vilbert.PRETRAINING_TASKS) <= set(vl_base.TASKS) and set(
        uniter.PRETRAINING_TASKS
    ) <= set(vl_base.TASKS)
    assert vilbert.pair_scores is uniter.pair_scores is vl_base.pair_scores
    assert vilbert.vqa_step is uniter.vqa_step is vl_base.vqa_step


def test_pretraining_losses_sums_weighted_tasks_and_names_what_is_missing():
    g = torch.Generator().manual_seed(0)
    output = PretrainingOutput(
        itm_logits=torch.randn(4, 2, generator=g, requires_grad=True),
        wra_distance=torch.rand(4, generator=g),
    )
    targets = {"itm_labels": torch.tensor([1, 0, 1, -100])}
    result = pretraining_losses(output, targets, ("itm", "wra"), weights={"wra": 0.1})
    assert set(result) == {"loss", "itm_loss", "itm_accuracy", "wra_loss"}
    torch.testing.assert_close(
        result["loss"].detach(), result["itm_loss"] + 0.1 * result["wra_loss"]
    )
    assert result["loss"].requires_grad and not result["itm_loss"].requires_grad
    with pytest.raises(ValueError, match="mrm"):
        pretraining_losses(output, targets, ("mrm",))
    with pytest.raises(ValueError, match="mlm_logits"):
        pretraining_losses(output, targets, ("mlm",))
    with pytest.raises(ValueError, match="itm_labels"):
        pretraining_losses(output, {}, ("itm",))
    with pytest.raises(ValueError, match="itm_labels"):
        pretraining_losses(output, {"itm_labels": torch.tensor([1, 0, 1])}, ("itm",))


def test_from_encoder_copies_the_encoder_and_refuses_another_architecture(tmp_path):
    for model in models():
        vqa_class = (
            vilbert.ViLBERTForVQA
            if isinstance(model, vilbert.ViLBERTForPretraining)
            else uniter.UniterForVQA
        )
        model.save_pretrained(tmp_path / type(model).__name__)
        for source in (model, model.encoder, tmp_path / type(model).__name__):
            vqa = vqa_class.from_encoder(source, num_answers=3, dropout=0.0)
            assert vqa.config.num_answers == 3 and vqa.config.dropout == 0.0
            for (name, a), b in zip(
                model.encoder.state_dict().items(), vqa.encoder.state_dict().values()
            ):
                assert torch.equal(a, b), name
        with pytest.raises(ValueError, match="max_text_len"):
            vqa_class.from_encoder(model, num_answers=3, max_text_len=8)
        with pytest.raises(TypeError, match="expected a"):
            vqa_class.from_encoder(torch.nn.Linear(2, 2), num_answers=3)
        with pytest.raises(TypeError, match="pretraining model"):
            vl_base.pair_scores(vqa, {}, {})
