"""The library's entry points: ``load``, ``plan_batch``, ``pack`` and synthetic checkpoints. Each reads as a short
story over the layers below: resolve the arguments and the checkpoint, read its facts, plan, build."""
