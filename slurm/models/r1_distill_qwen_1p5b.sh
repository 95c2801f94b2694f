# shellcheck shell=bash disable=SC2034  # sourced: the variables are read by the caller
# deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (Qwen2ForCausalLM), student of the pair
# JustRL-DeepSeek-1.5B (teacher, justrl_1p5b) -> DeepSeek-R1-Distill-Qwen-1.5B.
#
# Architecture facts copied from the model's HF config.json. The conversion tools read
# config.json themselves; these document the model and give the sbatch scripts their
# default layout. All models here share the Qwen2 tokenizer and a padded vocabulary of
# 151936 rows, which on-policy distillation needs (teacher and student score the same ids).

HF_REPO=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
HF_ARCHITECTURE=Qwen2ForCausalLM
NUM_LAYERS=28                   # num_hidden_layers
HIDDEN_SIZE=1536                # hidden_size
FFN_HIDDEN_SIZE=8960            # intermediate_size (SwiGLU)
NUM_ATTENTION_HEADS=12          # num_attention_heads
NUM_KV_HEADS=2                  # num_key_value_heads (GQA query groups)
HEAD_DIM=128                    # head_dim
VOCAB_SIZE=151936               # vocab_size (embedding rows; the tokenizer has fewer ids)
ROPE_THETA=10000                # rope_theta
RMS_NORM_EPS=1e-6               # rms_norm_eps
MAX_POSITION_EMBEDDINGS=131072  # max_position_embeddings
TIE_WORD_EMBEDDINGS=false       # tie_word_embeddings
QK_LAYERNORM=false              # per-head RMSNorm on q and k (Qwen3)
QKV_BIAS=true                   # bias on the q/k/v projections (Qwen2)

# Default layout on 8 x H100 80GB (bf16); the scripts let TP/PP override them.
MODEL_TP=1
MODEL_PP=1
