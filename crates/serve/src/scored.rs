//! The unit of a search answer, shared by the model thread ([`crate::engine`], which turns
//! [`retrieval::ResidentIndex`] hits into image ids) and the JSON routes ([`crate::http`]).

/// One ranked gallery image.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Scored {
    pub image_id: i64,
    pub score: f32,
}
