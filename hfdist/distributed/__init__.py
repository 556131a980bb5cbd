"""Backends behind one interface (base.py): single process, FSDP2 (with tensor parallelism), DeepSpeed ZeRO-3;
``backends.build_backend`` picks one. Also: the launch environment (env.py), the layout check shared with
``hfdist plan`` (layout.py), parallelism applied to a model (parallelize.py), the plan itself (plan.py)."""
