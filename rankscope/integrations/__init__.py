"""Integrations with training loops: callbacks that log rankscope's measures of a live model.

``rankscope.integrations.transformers`` holds the Hugging Face Trainer callback (the optional extra
``rankscope[transformers]``), ``rankscope.integrations.lightning`` the Lightning one (``rankscope[lightning]``);
``rankscope.integrations.live`` reads a live PEFT model's LoRA layers and needs nothing beyond torch.
"""
