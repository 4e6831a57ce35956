"""What stands in the way of each target when a run misses it (or cannot measure it): the profiles and
measurements behind each explanation are in results.md's sections and in the closing notes of the issues.
results.md lists these under the targets table for every target that is not met."""

_SMALL_GEMMS = (
    "both sides run the same base-model kernels, and on this CPU those are the bulk of the time (matmul is the "
    "largest category in the profile below); MiniLM's GEMMs are 384 wide over batches of a few hundred tokens, "
    "where the fp32 peak measured with 2048^3 GEMMs is out of reach (see the achieved GFLOP/s)")

OBSTACLES = {
    "inference, lorafit merged vs base model": (
        "a merged model is the base model's own Linear layers holding other weights: the same kernels on the same "
        "shapes, so what this run shows is the virtual machine's timing noise (see the 95% interval in the "
        "inference table), not work lorafit adds."),
    "16-adapter mixed batch vs single-adapter batch, all-linear": (
        "a batch on one adapter now runs one GEMM on the merged weight W0 + s B A when nothing is being trained "
        "(1.06x the base with all-linear targets); a mixed batch cannot merge (every row has its own factors), so it "
        "adds each row's rank-r update, which streams every layer's input and output through memory once more "
        "(`merged_weight` against `unmerged` in the LoRA-branch table). Against the base model the 16-adapter batch "
        "costs about 1.19x, PEFT's 2.4x."),
    "classifier samples/s vs PEFT + Trainer (article)": (
        "what lorafit removes from PEFT + Trainer's epoch (1.84x padding, the last layer's unused positions, most "
        "of dropout's random numbers, the Trainer's per-step overhead) is worth about 2x; " + _SMALL_GEMMS + ". "
        "bf16 (AMX) speeds lorafit's epoch up by about a quarter here, with the same accuracy (see the bf16 table), "
        "which still leaves it short of 3x PEFT's fp32 run."),
    "classifier samples/s vs PEFT + Trainer, group_by_length": (
        "with length grouping PEFT + Trainer pads as little as lorafit does (1.02x), so the gap left is lorafit's "
        "exact tricks and the Trainer's overhead; " + _SMALL_GEMMS + "."),
    "LLM training tokens/s vs PEFT + Trainer": (
        "lorafit already computes the LM head only at scored tokens and a shared prompt prefix once; what is left "
        "is SmolLM2's body, forward and backward, with the same kernels on both sides (576 wide: the small-GEMM "
        "limit above) and no padding to remove (length-grouped batches of 4 carry little). In the profile below "
        "matmuls take about half of lorafit's operator time and elementwise operators a quarter (RMSNorm, SwiGLU, "
        "rotary embeddings: chains of memory-bound operators that only a compiler, e.g. torch.compile, could fuse; "
        "neither side compiles)."),
    "serving: classifier requests/s, batched vs one at a time": (
        "a MiniLM forward on this CPU costs about its tokens: batches of 64 save under 2x per text in the forward "
        "alone (the serve section's ceiling), so batching cannot reach 5x here; a GPU, where such a forward is "
        "launch-bound, is where it would."),
    "GPU instruction tuning (length spread, chat template, padding-free) tokens/s vs PEFT + Trainer": (
        "needs a CUDA machine: `python bench/run.py --cases gpu --out DIR` there (none was lent to this project's "
        "runs yet); the smoke suite runs the same code on tiny configs on the CPU."),
    "classifier accuracy, bf16 autocast vs fp32 (CPUs with fast bf16)": (
        "measured only on CPUs with AVX512-BF16 or AMX (and GPUs): elsewhere lorafit refuses --mixed-precision bf16."),
}
