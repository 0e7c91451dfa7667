"""`make demo`: the whole pipeline on generated colored shapes (shapes.py), with its own small VAE
(train_vae.py), run end to end by run.py."""
