"""Task codecs (ADDP §2): each task is one small file registered here."""

from __future__ import annotations

from genperc.errors import UserError
from genperc.tasks.base import Task, TaskBatch
from genperc.tasks.caption import CaptionTask
from genperc.tasks.classification import ClassificationTask
from genperc.tasks.depth import DepthTask
from genperc.tasks.generalist import GeneralistTask
from genperc.tasks.referring import ReferringTask

TASKS: dict[str, type[Task]] = {
    CaptionTask.name: CaptionTask,
    ClassificationTask.name: ClassificationTask,
    DepthTask.name: DepthTask,
    ReferringTask.name: ReferringTask,
    GeneralistTask.name: GeneralistTask,
}


def create_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'", "choose one of: " + ", ".join(sorted(TASKS)))
    try:
        return TASKS[name](**kwargs)
    except TypeError as e:
        raise UserError(f"bad task_options for task '{name}': {e}", "see the task's docstring for its options") from e


__all__ = ["TASKS", "CaptionTask", "DepthTask", "GeneralistTask", "ReferringTask", "Task", "TaskBatch", "create_task"]
