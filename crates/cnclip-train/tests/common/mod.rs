//! Shared by the integration tests: a tiny model config (2 ViT blocks, 2 BERT layers).

use cnclip_model::ClipConfig;

/// A tiny ViT + BERT config whose text tower has dropout `dropout`.
pub fn tiny_config(dropout: f64) -> ClipConfig {
    let mut config = ClipConfig::from_json_str(
        r#"{"embed_dim":16,"image_resolution":32,"vision_layers":2,"vision_width":32,"vision_patch_size":8,
            "vision_head_width":16,"vocab_size":300,"text_attention_probs_dropout_prob":0.0,
            "text_hidden_act":"gelu","text_hidden_dropout_prob":0.0,"text_hidden_size":24,
            "text_initializer_range":0.02,"text_intermediate_size":48,"text_max_position_embeddings":64,
            "text_num_attention_heads":2,"text_num_hidden_layers":2,"text_type_vocab_size":2}"#,
        "tiny test config",
    )
    .expect("the tiny config is valid");
    config.text.text_hidden_dropout_prob = dropout;
    config.text.text_attention_probs_dropout_prob = dropout;
    config
}
