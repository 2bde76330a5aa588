"""Label-free teacher fitness: agreement with / KL to the float model on a calibration split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deap_quant import Evaluator, evolve, quantize
from deap_quant.evaluation.teacher import (
    TeacherAgreement,
    TeacherEvaluator,
    TeacherKL,
    calibration_inputs,
    split_calibration,
    teacher_outputs,
)


class CountingModel(nn.Module):
    """Wraps a model and counts its forward calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, inputs):
        self.calls += 1
        return self.model(inputs)


def test_metrics_agree_with_a_direct_computation():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [0.3, 0.2, 0.1]])
    teacher = torch.tensor([[1.0, 0.5, -1.0], [0.0, 0.2, 1.0], [2.0, 0.0, 0.0]])
    metric = TeacherAgreement()
    metric.update(student[:2], teacher[:2])
    metric.update(student[2:], teacher[2:])
    p = F.softmax(teacher, dim=1)
    kl = float((p * (p.log() - F.log_softmax(student, dim=1))).sum(dim=1).mean())
    summary = metric.summary()
    assert summary["agreement"] == pytest.approx(2 / 3)
    assert summary["kl"] == pytest.approx(kl, rel=1e-5)
    assert metric.fitness() == (pytest.approx(2 / 3), pytest.approx(-kl, rel=1e-5))
    kl_metric = TeacherKL()
    kl_metric.update(student, teacher)
    assert kl_metric.fitness() == (pytest.approx(-kl, rel=1e-5), pytest.approx(2 / 3))
    same = TeacherKL()
    same.update(teacher, teacher)
    assert same.summary() == {"kl": pytest.approx(0.0, abs=1e-6), "agreement": 1.0}
    with pytest.raises(ValueError, match="same shape"):
        TeacherKL().update(student, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="temperature"):
        TeacherKL(temperature=0)


def test_teacher_outputs_are_computed_once(tiny_model, tiny_data):
    counting = CountingModel(tiny_model)
    qmodel = quantize(tiny_model, bits=2)
    evaluator = TeacherEvaluator(qmodel, tiny_data, teacher=counting, batch_size=16)
    assert counting.calls == 3  # 48 inputs in batches of 16
    for genes in ([], [(0, 1, 1)], [(1, 5, -1), (0, 2, 1)]):
        evaluator(genes)
    evaluator.scores([])
    assert counting.calls == 3 and evaluator.evaluations == 3
    torch.testing.assert_close(evaluator.teacher_logits, tiny_model(tiny_data[0]))


def test_fitness_measures_closeness_to_the_float_model_without_labels(tiny_model, tiny_data):
    inputs, _ = tiny_data
    fine, coarse = quantize(tiny_model, bits=8), quantize(tiny_model, bits=2)
    kl = {}
    for name, qmodel in (("fine", fine), ("coarse", coarse)):
        evaluator = TeacherEvaluator(qmodel, inputs, teacher=tiny_model)
        kl[name] = -evaluator([])[0]
        assert evaluator.headline == "kl"
    assert 0 <= kl["fine"] < kl["coarse"]
    # labels are ignored: inputs alone and (inputs, any labels) give the same fitness
    scrambled = (inputs, torch.randint(0, 4, (len(inputs),), generator=torch.Generator().manual_seed(9)))
    a = TeacherEvaluator(coarse, inputs, teacher=tiny_model, objective="agreement")
    b = TeacherEvaluator(coarse, scrambled, teacher=tiny_model, objective="agreement")
    assert a([(0, 3, 1)]) == b([(0, 3, 1)])
    assert a.headline == "agreement" and 0.0 <= a([])[0] <= 1.0


def test_combined_fitness_modes(tiny_model, tiny_data):
    inputs, targets = tiny_data
    calibration, val = inputs[:32], (inputs[32:], targets[32:])
    qmodel = quantize(tiny_model, bits=2)
    genes = [(0, 4, 1), (1, 10, -1)]
    labelled = Evaluator(qmodel, val).scores(genes)
    teacher_only = TeacherEvaluator(qmodel, calibration, teacher=tiny_model, val=val)
    kl = -teacher_only(genes)[0]
    tiebreak = TeacherEvaluator(qmodel, calibration, teacher=tiny_model, val=val, combine="tiebreak")
    assert tiebreak(genes) == (pytest.approx(labelled["accuracy"]), pytest.approx(-kl))
    weighted = TeacherEvaluator(qmodel, calibration, teacher=tiny_model, val=val, combine="weighted", weight=0.5)
    assert weighted(genes) == (pytest.approx(labelled["accuracy"] - 0.5 * kl), pytest.approx(labelled["accuracy"]))
    # reports show the labelled metric; re-scoring on other data uses it too
    scores = teacher_only.scores(genes)
    assert scores["accuracy"] == labelled["accuracy"] and scores["teacher_kl"] == pytest.approx(kl)
    assert teacher_only.headline == "accuracy"
    tester = teacher_only.with_data(val)
    assert isinstance(tester, Evaluator) and tester.scores(genes)["accuracy"] == labelled["accuracy"]
    with pytest.raises(ValueError, match="needs the validation split"):
        TeacherEvaluator(qmodel, calibration, teacher=tiny_model, combine="tiebreak")
    with pytest.raises(ValueError, match="combine='sum'"):
        TeacherEvaluator(qmodel, calibration, teacher=tiny_model, val=val, combine="sum")
    with pytest.raises(ValueError, match="exactly one"):
        TeacherEvaluator(qmodel, calibration)
    with pytest.raises(ValueError, match="objective='mse'"):
        TeacherEvaluator(qmodel, calibration, teacher=tiny_model, objective="mse")
    with pytest.raises(ValueError, match="no labelled metric"):
        TeacherEvaluator(qmodel, calibration, teacher=tiny_model).with_data(val)


@pytest.mark.parametrize("combine", [None, "tiebreak", "weighted"])
def test_fast_and_plain_teacher_fitness_are_bit_identical(tiny_model, tiny_data, combine):
    inputs, targets = tiny_data
    calibration, val = inputs[:32], (inputs[32:], targets[32:])
    qmodel = quantize(tiny_model, bits=2)
    options = {"teacher": tiny_model, "val": val, "combine": combine, "batch_size": 8}
    fast = TeacherEvaluator(qmodel, calibration, **options)
    plain = TeacherEvaluator(qmodel, calibration, fast=False, **options)
    genomes = [[], [(0, 4, 1)], [(0, 4, 1), (1, 10, -1)], [(1, 10, -1)], [(0, 4, 1), (1, 10, -1), (1, 3, 1)]]
    assert [fast(genes) for genes in genomes] == [plain(genes) for genes in genomes]
    assert fast.calibration.stats()["mean_start_stage"] > 0  # later genomes resumed from cached activations
    with pytest.raises(ValueError, match="fast='yes'"):
        TeacherEvaluator(qmodel, calibration, teacher=tiny_model, fast="yes")


class RecordingSplit(torch.utils.data.Dataset):
    """A dataset that records when it is read."""

    def __init__(self, inputs, targets):
        self.inputs, self.targets, self.reads = inputs, targets, 0

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        self.reads += 1
        return self.inputs[index], self.targets[index]


def test_evolve_with_teacher_fitness_scores_test_only_after_the_search(tiny_model, tiny_data):
    inputs, targets = tiny_data
    qmodel = quantize(tiny_model, bits=2)
    test = RecordingSplit(inputs[32:], targets[32:])
    evaluator = TeacherEvaluator(qmodel, inputs[:24], teacher=tiny_model, val=(inputs[24:32], targets[24:32]))
    reads_during_search = []
    result = evolve(qmodel, test=test, evaluator=evaluator, mu=4, lambda_=6, ngen=3, seed=0, progress=False,
                    callback=lambda state: reads_during_search.append(test.reads))
    assert reads_during_search == [0, 0, 0] and test.reads > 0
    assert result.metric == "accuracy"
    assert result.best["test"] == Evaluator(qmodel, (inputs[32:], targets[32:])).scores(result.best["genes"])["accuracy"]
    # the search maximised the teacher fitness: the best's KL is no worse than the start's
    assert result.best["val_scores"]["teacher_kl"] <= result.baseline["val_scores"]["teacher_kl"]


def test_calibration_helpers(tiny_data):
    inputs, targets = tiny_data
    assert torch.equal(calibration_inputs((inputs, targets)), inputs)
    picked = calibration_inputs(inputs, 10, seed=2)
    assert picked.shape == (10, 1, 8, 8) and torch.equal(picked, calibration_inputs(inputs, 10, seed=2))
    assert not torch.equal(picked, calibration_inputs(inputs, 10, seed=3))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=7)
    assert torch.equal(calibration_inputs(loader), inputs)
    search, holdout = split_calibration((inputs, targets), 0.25, seed=1)
    assert len(search) == 36 and len(holdout) == 12
    rows = {tuple(x.flatten().tolist()) for x in inputs}
    assert {tuple(x.flatten().tolist()) for x in search} | {tuple(x.flatten().tolist()) for x in holdout} == rows
    assert not {tuple(x.flatten().tolist()) for x in search} & {tuple(x.flatten().tolist()) for x in holdout}
    with pytest.raises(ValueError, match="holdout=1.5"):
        split_calibration(inputs, 1.5)
    with pytest.raises(ValueError, match="empty"):
        calibration_inputs(inputs[:0])
    with pytest.raises(ValueError, match="classes"):
        teacher_outputs(nn.Flatten(0), inputs[:2])
