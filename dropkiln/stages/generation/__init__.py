"""The parts of the generate stage (``stages/generate.py``), as ``training/`` holds train's.

- ``prompt_file``: prompt files (.toml, .json, .txt) validated and expanded into images
- ``run``: one job's run: the warm pipeline set up, images batched, rendered and kept
- ``render``: the diffusers calls for a batch of images or a latent-walk frame
- ``schedulers``: A1111 sampler names and diffusers schedulers
- ``memory_ladder``: the inference memory rungs, applied to a warm pipeline and undone
- ``controlnet``, ``img2img``, ``references``, ``lora_loading``: what an entry can add to
  the base pipeline
- ``latent_walk``: the walk's plan and its interpolation
- ``png_files``: PNGs with their parameters, the contact sheet, latent previews

Like every stage module, these import torch and diffusers lazily.
"""
