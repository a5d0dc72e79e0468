"""adapt.transfer.registry: every task declared once (name, data group, budget dataclass, run), budgets checked
before any work, and the defaults in one place (the YAML of `synth transfer` agrees with them)."""

import dataclasses
import inspect

import pytest
from omegaconf import OmegaConf

from adapt.transfer import REGISTRY, TASK_DATA, TASKS, FinetuneBudget, check_budget, finetune_classifier, get_task
from adapt.transfer.task import budget_text
from apps.transfer import TASK_DATA as APP_TASK_DATA
from apps.transfer import TransferData
from synth.config import CONFIG_DIR


def test_every_task_has_a_data_group_a_budget_and_a_run():
    assert TASKS == ("linear_probe", "finetune", "detection", "segmentation", "depth")
    groups = {f.name for f in dataclasses.fields(TransferData)}
    for task in REGISTRY:
        assert get_task(task.name) is task
        assert task.data in groups, task
        assert dataclasses.is_dataclass(task.budget), task
        budget = task.budget()  # every field has a default
        assert set(task.budget.SHOWN) <= {f.name for f in dataclasses.fields(budget)}, task
        assert callable(task.run)
    assert TASK_DATA == {"linear_probe": "classification", "finetune": "classification", "detection": "detection",
                         "segmentation": "segmentation", "depth": "depth"}
    assert APP_TASK_DATA is TASK_DATA  # the app reads the registry, it keeps no copy


def test_budget_typo_and_wrong_type_fail_naming_the_key():
    with pytest.raises(ValueError, match=r"budget\['detection'\]: unknown setting 'stepz'; expected one of \[") as e:
        check_budget({"detection": {"stepz": 1}})
    assert "'steps'" in str(e.value) and "'kind'" in str(e.value) and len(str(e.value).splitlines()) == 1
    with pytest.raises(ValueError, match=r"budget\['segmentation'\]\.steps: expected int, got 'many'"):
        check_budget({"segmentation": {"steps": "many"}})
    with pytest.raises(ValueError, match=r"budget\['finetune'\]\.lr: expected float, got True"):
        check_budget({"finetune": {"lr": True}})
    with pytest.raises(ValueError, match=r"budget\['linear_probe'\]\.stages: expected .*got \[1, 2\]"):
        check_budget({"linear_probe": {"stages": [1, 2]}})
    with pytest.raises(ValueError, match=r"budget\['detection'\]: kind: expected one of .*'maskrcnn'.*got 'yolo'"):
        check_budget({"detection": {"kind": "yolo"}})
    with pytest.raises(ValueError, match=r"budget: unknown task\(s\) \['detectoin'\]"):
        check_budget({"detectoin": {}})
    with pytest.raises(ValueError, match=r"'seed' is run_transfer's own argument"):
        check_budget({"depth": {"seed": 1}})


def test_budget_over_defaults_and_its_text():
    budgets = check_budget({"detection": {"steps": 3, "fpn_channels": 32, "lr": 1}, "linear_probe": {"n_jobs": -1}})
    assert budgets["detection"].steps == 3 and budgets["detection"].fpn_channels == 32
    assert budgets["segmentation"] == get_task("segmentation").budget()
    assert budget_text(budgets["detection"], ["steps", "fpn_channels", "lr"]) == \
        "kind=fasterrcnn,steps=3,batch_size=4,lr=1,min_size=256,max_size=512,fpn_channels=32"
    assert budget_text(budgets["linear_probe"], ["n_jobs"]) == "size=32,n_jobs=-1"  # stages=None is left out


def test_finetune_default_agrees_with_the_transfer_config():
    yaml = OmegaConf.load(CONFIG_DIR / "synth_transfer.yaml")
    assert yaml.budget.finetune.get("steps", FinetuneBudget.steps) == FinetuneBudget.steps
    # The function's own default is the budget's, not a third number.
    assert inspect.signature(finetune_classifier).parameters["steps"].default == FinetuneBudget.steps
