//! What a GGUF file says about its model: the decoder family, the hyper-parameters read from its metadata
//! (validated: sizes non-zero, head counts dividing, products not overflowing) and a check of every tensor the
//! engine reads against them, before any weight is loaded. Also the in-memory weight modes.

use std::path::Path;

use candle_core::quantized::gguf_file;

use super::{EngineError, Result};

/// Which decoder family a GGUF holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Gemma3,
}

/// How the linear weights are held in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightMode {
    /// De-quantized to f32 at load (the parity reference: the same weights transformers loads).
    F32,
    /// The GGUF's own quantized blocks, multiplied by candle's quantized kernels.
    Native,
    /// Re-quantized to Q8_0 at load (int8 dot products); layers whose input size is not a multiple of 32 stay f32.
    Q8_0,
}

impl WeightMode {
    /// Parse `"f32"`, `"native"` or `"q8_0"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "dequantize" | "dequantized" => Ok(Self::F32),
            "native" | "gguf" => Ok(Self::Native),
            "q8_0" | "q8" | "int8" => Ok(Self::Q8_0),
            _ => Err(EngineError::Input(format!("weights must be 'f32', 'native' or 'q8_0', got {s:?}"))),
        }
    }
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layer: usize,
    pub d_model: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab: usize,
    pub eps: f32,
    pub rope_base: f32,
    /// Rope base of sliding-window layers (Gemma 3).
    pub rope_base_local: f32,
    /// Keys at query position q are visible when q − k < window (sliding layers only).
    pub sliding_window: Option<usize>,
    /// Every `swa_pattern`-th layer (1-based) is global; 0 = no sliding layers.
    pub swa_pattern: usize,
    pub attn_scale: f32,
    pub embed_scale: f32,
}

impl ModelConfig {
    /// Whether layer `l` attends through the sliding window.
    pub fn is_sliding(&self, l: usize) -> bool {
        self.swa_pattern > 0 && self.sliding_window.is_some() && (l + 1) % self.swa_pattern != 0
    }

    pub(crate) fn rope_base_of(&self, l: usize) -> f32 {
        if self.is_sliding(l) {
            self.rope_base_local
        } else {
            self.rope_base
        }
    }
}

fn meta_usize(md: &std::collections::HashMap<String, gguf_file::Value>, key: &str) -> Result<Option<usize>> {
    use gguf_file::Value as V;
    Ok(match md.get(key) {
        None => None,
        Some(V::U8(x)) => Some(*x as usize),
        Some(V::U16(x)) => Some(*x as usize),
        Some(V::U32(x)) => Some(*x as usize),
        Some(V::U64(x)) => Some(*x as usize),
        Some(V::I8(x)) if *x >= 0 => Some(*x as usize),
        Some(V::I16(x)) if *x >= 0 => Some(*x as usize),
        Some(V::I32(x)) if *x >= 0 => Some(*x as usize),
        Some(V::I64(x)) if *x >= 0 => Some(*x as usize),
        Some(other) => {
            return Err(EngineError::Format(format!("metadata {key}: expected a non-negative integer, got {other:?}")))
        }
    })
}

fn meta_f32(md: &std::collections::HashMap<String, gguf_file::Value>, key: &str) -> Result<Option<f32>> {
    use gguf_file::Value as V;
    Ok(match md.get(key) {
        None => None,
        Some(V::F32(x)) => Some(*x),
        Some(V::F64(x)) => Some(*x as f32),
        Some(other) => return Err(EngineError::Format(format!("metadata {key}: expected a float, got {other:?}"))),
    })
}

impl ModelConfig {
    pub(crate) fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let md = &content.metadata;
        let arch_name = match md.get("general.architecture") {
            Some(gguf_file::Value::String(s)) => s.clone(),
            _ => return Err(EngineError::Format(format!("{}: metadata general.architecture missing", path.display()))),
        };
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(EngineError::Format(format!(
                    "{}: architecture {other:?} is not supported by the Rust engine (llama, gemma3); \
                     use --engine torch",
                    path.display()
                )))
            }
        };
        let file = path.display();
        let bad = |k: &str, what: String| EngineError::Format(format!("{file}: metadata {arch_name}.{k} {what}"));
        let in_file = |e: EngineError| EngineError::Format(format!("{file}: {e}"));
        let opt = |k: &str| meta_usize(md, &format!("{arch_name}.{k}")).map_err(in_file);
        let need = |k: &str| -> Result<usize> { opt(k)?.ok_or_else(|| bad(k, "missing".into())) };
        let positive = |k: &str, v: usize| -> Result<usize> {
            if v == 0 {
                Err(bad(k, "is 0; it must be positive".into()))
            } else {
                Ok(v)
            }
        };
        let n_layer = positive("block_count", need("block_count")?)?;
        let d_model = positive("embedding_length", need("embedding_length")?)?;
        let d_ff = positive("feed_forward_length", need("feed_forward_length")?)?;
        let n_head = positive("attention.head_count", need("attention.head_count")?)?;
        let n_kv_head = positive("attention.head_count_kv", opt("attention.head_count_kv")?.unwrap_or(n_head))?;
        if n_head % n_kv_head != 0 {
            return Err(bad(
                "attention.head_count_kv",
                format!("= {n_kv_head} does not divide attention.head_count = {n_head}"),
            ));
        }
        let (head_dim, head_key) = match (opt("attention.key_length")?, opt("rope.dimension_count")?) {
            (Some(k), _) => (positive("attention.key_length", k)?, "attention.key_length"),
            (None, Some(r)) => (positive("rope.dimension_count", r)?, "rope.dimension_count"),
            (None, None) => match d_model.checked_div(n_head) {
                Some(h) if h > 0 && d_model % n_head == 0 => (h, "embedding_length"),
                _ => {
                    return Err(bad(
                        "embedding_length",
                        format!("= {d_model} is not a multiple of attention.head_count = {n_head} (and no key_length)"),
                    ))
                }
            },
        };
        if head_dim % 2 != 0 {
            return Err(bad(head_key, format!("gives an odd head dimension {head_dim}; rotary pairs need it even")));
        }
        if let Some(v) = opt("attention.value_length")? {
            if v != head_dim {
                return Err(bad(
                    "attention.value_length",
                    format!("= {v} differs from the key length {head_dim}; the Rust engine needs them equal"),
                ));
            }
        }
        let positive_f32 = |k: &str, default: f32| -> Result<f32> {
            let v = meta_f32(md, &format!("{arch_name}.{k}")).map_err(in_file)?.unwrap_or(default);
            if v.is_finite() && v >= 0.0 && (v > 0.0 || k.ends_with("epsilon")) {
                Ok(v)
            } else {
                Err(bad(k, format!("= {v} must be a finite positive number")))
            }
        };
        let eps = positive_f32("attention.layer_norm_rms_epsilon", 1e-5)?;
        let rope_base = positive_f32("rope.freq_base", 10_000.0)?;
        let embd = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| EngineError::Format(format!("{file}: tensor token_embd.weight missing")))?;
        let vocab = match embd.shape.dims() {
            &[v, d] if d == d_model && v > 0 => v,
            dims => {
                return Err(EngineError::Format(format!(
                    "{file}: tensor token_embd.weight has shape {dims:?}, expected [vocab, {d_model}] \
                     (metadata {arch_name}.embedding_length = {d_model})"
                )))
            }
        };
        let (sliding_window, swa_pattern, rope_base_local, embed_scale) = match arch {
            Arch::Llama => (None, 0, rope_base, 1.0),
            // Gemma 3: five local layers then one global (llama.cpp / transformers), local rope base 10 000.
            Arch::Gemma3 => (
                match opt("attention.sliding_window")? {
                    Some(0) => return Err(bad("attention.sliding_window", "is 0; it must be positive".into())),
                    w => w,
                },
                6,
                10_000.0,
                (d_model as f32).sqrt(),
            ),
        };
        Ok(Self {
            arch,
            n_layer,
            d_model,
            n_head,
            n_kv_head,
            head_dim,
            d_ff,
            vocab,
            eps,
            rope_base,
            rope_base_local,
            sliding_window,
            swa_pattern,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            embed_scale,
        })
    }
}

impl ModelConfig {
    /// Check every tensor the engine reads against this configuration (presence and shape), before any is
    /// loaded, so that no later slice can run out of range. Shapes are (rows, columns) as `Linear` holds them.
    ///
    /// # Errors
    /// [`EngineError::Format`] naming the file, the tensor and the metadata field it disagrees with.
    pub fn check_tensors(&self, content: &gguf_file::Content, path: &Path) -> Result<()> {
        let file = path.display();
        let arch = match self.arch {
            Arch::Llama => "llama",
            Arch::Gemma3 => "gemma3",
        };
        let overflow = |what: &str| EngineError::Format(format!("{file}: metadata {arch}.{what} overflows"));
        let (d, hd, ff, v) = (self.d_model, self.head_dim, self.d_ff, self.vocab);
        let q = self.n_head.checked_mul(hd).ok_or_else(|| overflow("attention.head_count × key_length"))?;
        let kv = self.n_kv_head.checked_mul(hd).ok_or_else(|| overflow("attention.head_count_kv × key_length"))?;
        // Blocks present in the file: bounds the per-block loop below by the file's own size.
        let mut present = std::collections::BTreeSet::new();
        for name in content.tensor_infos.keys() {
            if let Some(i) =
                name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|i| i.parse::<usize>().ok())
            {
                present.insert(i);
            }
        }
        if let Some(missing) = (0..self.n_layer.min(present.len() + 1)).find(|i| !present.contains(i)) {
            return Err(EngineError::Format(format!(
                "{file}: metadata {arch}.block_count = {} but the file has no tensors for block {missing} \
                 ({} blocks present)",
                self.n_layer,
                present.len()
            )));
        }
        let fields = |what: &str| -> String {
            match what {
                "d" => format!("{arch}.embedding_length = {d}"),
                "ff" => format!("{arch}.feed_forward_length = {ff}"),
                "q" => format!("{arch}.attention.head_count = {} × head dim {hd}", self.n_head),
                "kv" => format!("{arch}.attention.head_count_kv = {} × head dim {hd}", self.n_kv_head),
                "hd" => format!("head dim {hd}"),
                _ => "the vocabulary (token_embd.weight rows)".into(),
            }
        };
        let check = |name: &str, want: &[(usize, &str)], required: bool| -> Result<()> {
            let Some(info) = content.tensor_infos.get(name) else {
                return if required {
                    Err(EngineError::Format(format!("{file}: tensor {name} missing")))
                } else {
                    Ok(())
                };
            };
            let dims = info.shape.dims();
            if dims.len() != want.len() || dims.iter().zip(want).any(|(a, b)| *a != b.0) {
                let expected: Vec<usize> = want.iter().map(|w| w.0).collect();
                let from: Vec<String> = want.iter().map(|w| fields(w.1)).collect();
                return Err(EngineError::Format(format!(
                    "{file}: tensor {name} has shape {dims:?}, expected {expected:?} (from metadata {})",
                    from.join(", ")
                )));
            }
            Ok(())
        };
        let gemma = self.arch == Arch::Gemma3;
        check("token_embd.weight", &[(v, "v"), (d, "d")], true)?;
        check("output.weight", &[(v, "v"), (d, "d")], false)?;
        check("output_norm.weight", &[(d, "d")], true)?;
        for l in 0..self.n_layer {
            let p = |s: &str| format!("blk.{l}.{s}");
            check(&p("attn_norm.weight"), &[(d, "d")], true)?;
            check(&p("attn_q.weight"), &[(q, "q"), (d, "d")], true)?;
            check(&p("attn_k.weight"), &[(kv, "kv"), (d, "d")], true)?;
            check(&p("attn_v.weight"), &[(kv, "kv"), (d, "d")], true)?;
            check(&p("attn_output.weight"), &[(d, "d"), (q, "q")], true)?;
            check(&p("attn_q_norm.weight"), &[(hd, "hd")], false)?;
            check(&p("attn_k_norm.weight"), &[(hd, "hd")], false)?;
            check(&p("post_attention_norm.weight"), &[(d, "d")], gemma)?;
            check(&p("ffn_norm.weight"), &[(d, "d")], true)?;
            check(&p("ffn_gate.weight"), &[(ff, "ff"), (d, "d")], true)?;
            check(&p("ffn_up.weight"), &[(ff, "ff"), (d, "d")], true)?;
            check(&p("ffn_down.weight"), &[(d, "d"), (ff, "ff")], true)?;
            check(&p("post_ffw_norm.weight"), &[(d, "d")], gemma)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::Shape;
    use gguf_file::{Content, TensorInfo, Value, VersionedMagic};
    use std::collections::HashMap;

    /// A llama header: 2 blocks, width 16, 2 heads of 8, 1 kv head, d_ff 32, vocab 10, and its tensors' shapes.
    fn llama() -> Content {
        let mut metadata = HashMap::new();
        metadata.insert("general.architecture".to_string(), Value::String("llama".into()));
        for (k, v) in [
            ("block_count", 2u32),
            ("embedding_length", 16),
            ("feed_forward_length", 32),
            ("attention.head_count", 2),
            ("attention.head_count_kv", 1),
        ] {
            metadata.insert(format!("llama.{k}"), Value::U32(v));
        }
        let mut tensor_infos = HashMap::new();
        let mut add = |name: String, dims: &[usize]| {
            tensor_infos
                .insert(name, TensorInfo { ggml_dtype: GgmlDType::F32, shape: Shape::from(dims.to_vec()), offset: 0 });
        };
        add("token_embd.weight".into(), &[10, 16]);
        add("output_norm.weight".into(), &[16]);
        for l in 0..2 {
            for (s, dims) in [
                ("attn_norm", &[16][..]),
                ("attn_q", &[16, 16]),
                ("attn_k", &[8, 16]),
                ("attn_v", &[8, 16]),
                ("attn_output", &[16, 16]),
                ("ffn_norm", &[16]),
                ("ffn_gate", &[32, 16]),
                ("ffn_up", &[32, 16]),
                ("ffn_down", &[16, 32]),
            ] {
                add(format!("blk.{l}.{s}.weight"), dims);
            }
        }
        Content { magic: VersionedMagic::GgufV3, metadata, tensor_infos, tensor_data_offset: 0 }
    }

    fn check(c: &Content) -> Result<ModelConfig> {
        let cfg = ModelConfig::from_gguf(c, Path::new("t.gguf"))?;
        cfg.check_tensors(c, Path::new("t.gguf"))?;
        Ok(cfg)
    }

    /// The error message for `c` after `set(key, value)` on the header (None: drop the key).
    fn refused(edits: &[(&str, Option<Value>)]) -> String {
        let mut c = llama();
        for (k, v) in edits {
            match v {
                Some(v) => c.metadata.insert(format!("llama.{k}"), v.clone()),
                None => c.metadata.remove(&format!("llama.{k}")),
            };
        }
        match check(&c) {
            Ok(cfg) => panic!("accepted {edits:?}: {cfg:?}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.starts_with("t.gguf: "), "{msg}");
                msg
            }
        }
    }

    #[test]
    fn valid_header_gives_the_config() {
        let cfg = check(&llama()).unwrap();
        assert_eq!((cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim), (2, 16, 2, 1, 8));
        assert_eq!((cfg.d_ff, cfg.vocab), (32, 10));
    }

    #[test]
    fn zero_or_missing_sizes_are_refused() {
        for k in [
            "block_count",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
        ] {
            let msg = refused(&[(k, Some(Value::U32(0)))]);
            assert!(msg.contains(&format!("llama.{k} is 0")), "{msg}");
        }
        for k in ["block_count", "embedding_length", "feed_forward_length", "attention.head_count"] {
            let msg = refused(&[(k, None)]);
            assert!(msg.contains(&format!("llama.{k} missing")), "{msg}");
        }
        let msg = refused(&[("attention.head_count", Some(Value::I32(-2)))]);
        assert!(msg.contains("llama.attention.head_count") && msg.contains("non-negative"), "{msg}");
    }

    #[test]
    fn head_counts_must_divide() {
        let msg = refused(&[("attention.head_count_kv", Some(Value::U32(3)))]);
        assert!(msg.contains("llama.attention.head_count_kv = 3 does not divide attention.head_count = 2"), "{msg}");
        // no key_length: the head dimension is embedding_length / head_count, which must be exact
        let msg = refused(&[("attention.head_count", Some(Value::U32(3))), ("attention.head_count_kv", None)]);
        assert!(msg.contains("llama.embedding_length = 16 is not a multiple of attention.head_count = 3"), "{msg}");
        let msg = refused(&[("attention.key_length", Some(Value::U32(7)))]);
        assert!(msg.contains("llama.attention.key_length") && msg.contains("odd"), "{msg}");
        let msg = refused(&[("attention.value_length", Some(Value::U32(4)))]);
        assert!(msg.contains("llama.attention.value_length = 4"), "{msg}");
    }

    #[test]
    fn header_sizes_must_match_the_tensors() {
        let msg = refused(&[("embedding_length", Some(Value::U32(12)))]);
        assert!(msg.contains("token_embd.weight has shape [10, 16]") && msg.contains("embedding_length = 12"), "{msg}");
        let msg = refused(&[("feed_forward_length", Some(Value::U32(24)))]);
        assert!(msg.contains("blk.0.ffn_gate.weight has shape [32, 16], expected [24, 16]"), "{msg}");
        let msg = refused(&[("attention.key_length", Some(Value::U32(4)))]);
        assert!(msg.contains("blk.0.attn_q.weight has shape [16, 16], expected [8, 16]"), "{msg}");
        let msg = refused(&[("rope.freq_base", Some(Value::F32(f32::NAN)))]);
        assert!(msg.contains("llama.rope.freq_base"), "{msg}");
    }

    #[test]
    fn block_count_must_match_the_blocks_present() {
        let msg = refused(&[("block_count", Some(Value::U32(3)))]);
        assert!(msg.contains("llama.block_count = 3 but the file has no tensors for block 2"), "{msg}");
        // a huge count is refused without walking every block
        let msg = refused(&[("block_count", Some(Value::U64(u64::MAX)))]);
        assert!(msg.contains("no tensors for block 2 (2 blocks present)"), "{msg}");
        let mut c = llama();
        c.tensor_infos.remove("blk.1.ffn_up.weight");
        assert!(check(&c).unwrap_err().to_string().contains("tensor blk.1.ffn_up.weight missing"));
        let mut c = llama();
        c.tensor_infos.get_mut("blk.1.attn_output.weight").unwrap().shape = Shape::from(vec![16, 8]);
        let msg = check(&c).unwrap_err().to_string();
        assert!(msg.contains("blk.1.attn_output.weight has shape [16, 8], expected [16, 16]"), "{msg}");
    }

    #[test]
    fn huge_header_products_are_refused_not_overflowed() {
        let big = Some(Value::U64(1 << 40));
        let msg = refused(&[
            ("attention.head_count", big.clone()),
            ("attention.head_count_kv", big.clone()),
            ("attention.key_length", big),
        ]);
        assert!(msg.contains("overflows"), "{msg}");
    }
}
