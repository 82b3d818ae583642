"""Integrations with training loops: callbacks that log rankscope's measures of a live model.

``rankscope.integrations.transformers`` holds the Hugging Face Trainer callback (the optional extra
``rankscope[transformers]``); ``rankscope.integrations.live`` reads a live PEFT model's LoRA layers and needs
nothing beyond torch. There is no Lightning callback: ``lightning`` is not installed here, so none is tested.
"""
