"""shapes-llava's training rows: the first question is laid out exactly as at inference, and
the attention target sits at the position that predicts each answer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    from mllm_deploy.datasets import shapes_vqa
    from mllm_deploy.models.shapes_llava import write_untrained
    from mllm_deploy.models.shapes_train import make_conversation_batch, prompt_builder
    from mllm_deploy.runtime.preprocess import ImagePreprocessConfig

    model_dir = write_untrained(tmp_path_factory.mktemp("shapes") / "init")
    builder = prompt_builder(model_dir)
    scenes = [shapes_vqa.scene("train", i, drill=1) for i in range(3)]
    out = make_conversation_batch(scenes, builder, ImagePreprocessConfig.from_model_dir(model_dir), 2, 3)
    return builder, scenes, out


def test_first_question_is_the_inference_prompt(batch):
    builder, scenes, (ids, mask, target, _weight, pixels, _looks) = batch
    assert pixels.shape[0] == len(scenes)
    for b, scene in enumerate(scenes):
        prompt = builder.encode(builder.render_chat(scene.qas[0][0]))[0].tolist()
        assert ids[b, :len(prompt)].tolist() == prompt
        answer = builder.tokenizer.token_to_id(scene.qas[0][1])
        assert target[b, len(prompt)].item() == answer  # the token right after the prompt is supervised
        assert (target[b, :len(prompt)] == -100).all()


def test_look_targets_sit_before_each_answer(batch):
    from mllm_deploy.models.shapes_train import look_loss

    builder, scenes, (ids, mask, target, _weight, _pixels, looks) = batch
    named = [(b, roles) for b, scene in enumerate(scenes) for roles in scene.relevance if roles.any()]
    assert [(b, r.tolist()) for b, _pos, r in looks] == [(b, r.tolist()) for b, r in named]
    answers = {builder.tokenizer.token_to_id(w) for w in ("yes", "no", "zero", "one", "two", "three", "red",
                                                          "green", "blue", "yellow", "purple", "orange",
                                                          "circle", "square", "triangle")}
    for b, pos, _roles in looks:
        assert builder.tokenizer.id_to_token(int(ids[b, pos])) == ":"
        assert int(target[b, pos + 1]) in answers
    # attention spread evenly over the sequence puts mass |named| / T on the named patches
    length = ids.shape[1]
    uniform = torch.full((len(scenes), 4, length, length), 1.0 / length)
    expected = []
    for _b, _pos, roles in looks:
        for role in (1, 2):
            if (roles == role).any():
                expected.append(-torch.log(torch.tensor((roles == role).sum() / length + 1e-6)))
    got = look_loss([None, None, uniform], ids, 4, looks, layer=2)
    assert got.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
