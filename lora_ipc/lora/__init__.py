"""The LoRA layer: tensor sets whose config is a LoRA config. :mod:`.peft` turns a ``PeftModel`` (or a
dict of tensors) into what is published, :mod:`.adapters` holds ``AdapterExporter`` / ``AdapterClient``,
and :mod:`.uri` the ``lora-ipc://`` URIs that name a published version."""
