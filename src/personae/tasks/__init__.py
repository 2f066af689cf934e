"""Tasks: a model and its objectives combined into one module, batch in, named losses out.

The whole loss is one module so that DDP (and meta-learning's functional calls) see every
parameter use inside one forward.
"""

from personae.tasks.pretrain import PretrainTask
from personae.tasks.roleplay import RolePlayTask, dense_roleplay_task

__all__ = ["PretrainTask", "RolePlayTask", "dense_roleplay_task"]
