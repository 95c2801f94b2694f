# shellcheck shell=bash disable=SC2034  # sourced: the variables are read by the caller
# Qwen/Qwen3-1.7B (Qwen3ForCausalLM), student of the pair Qwen3-8B (teacher, qwen3_8b) ->
# Qwen3-1.7B (student).
#
# Architecture facts copied from the model's HF config.json. The conversion tools read
# config.json themselves; these document the model and give the sbatch scripts their
# default layout. All models here share the Qwen2 tokenizer and a padded vocabulary of
# 151936 rows, which on-policy distillation needs (teacher and student score the same ids).

HF_REPO=Qwen/Qwen3-1.7B
HF_ARCHITECTURE=Qwen3ForCausalLM
NUM_LAYERS=28                   # num_hidden_layers
HIDDEN_SIZE=2048                # hidden_size
FFN_HIDDEN_SIZE=6144            # intermediate_size (SwiGLU)
NUM_ATTENTION_HEADS=16          # num_attention_heads
NUM_KV_HEADS=8                  # num_key_value_heads (GQA query groups)
HEAD_DIM=128                    # head_dim
VOCAB_SIZE=151936               # vocab_size (embedding rows; the tokenizer has fewer ids)
ROPE_THETA=1000000              # rope_theta
RMS_NORM_EPS=1e-6               # rms_norm_eps
MAX_POSITION_EMBEDDINGS=40960   # max_position_embeddings
TIE_WORD_EMBEDDINGS=true        # tie_word_embeddings
QK_LAYERNORM=true               # per-head RMSNorm on q and k (Qwen3)
QKV_BIAS=false                  # bias on the q/k/v projections (Qwen2)

# Default layout on 8 x H100 80GB (bf16); the scripts let TP/PP override them.
MODEL_TP=1
MODEL_PP=1
