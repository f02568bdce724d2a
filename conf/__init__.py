# Marks conf/ as the package ltrain.conf so Hydra finds it as pkg://ltrain.conf wherever ltrain is installed.
