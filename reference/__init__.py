"""The reference side: HF transformers on torch CPU, random checkpoints, and the
script that trains the committed tiny model. The only package that imports torch
or transformers."""
