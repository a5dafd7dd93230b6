# copied from ../shared/bench/sft_anchor_bench.py (make_model only)
LLAMA_3_2_3B = dict(
    vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
    num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu",
    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    bos_token_id=128000, eos_token_id=128009, pad_token_id=128004,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_model(d):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    torch.manual_seed(0)
    cfg = LlamaConfig(**LLAMA_3_2_3B)
    cfg.torch_dtype = "bfloat16"
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(d, safe_serialization=True)
    vocab = {f"w{i}": i for i in range(128000)}
    specials = {128000: "<|begin_of_text|>", 128004: "<|finetune_right_pad_id|>", 128009: "<|eot_id|>"}
    for i in range(128000, 128256):
        vocab[specials.get(i, f"<|reserved_{i}|>")] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>",
                                eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    t.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} <|eot_id|>{% endfor %}"
    t.save_pretrained(d)
    print("model saved", sum(p.numel() for p in m.parameters()) / 1e9, "B params")


