//! The unit of a search answer, shared by the ranking ([`crate::index`]), the model thread
//! ([`crate::engine`]) and the JSON routes ([`crate::http`]).

/// One ranked gallery image.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Scored {
    pub image_id: i64,
    pub score: f32,
}
