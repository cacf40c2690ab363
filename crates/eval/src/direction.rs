//! Which way retrieval goes, and so which JSON keys and messages the files use.

/// Text→image (`evaluation.py`: `text_id` → `image_ids`) or image→text (`evaluation_tr.py`:
/// `image_id` → `text_ids`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    TextToImage,
    ImageToText,
}

impl Direction {
    /// The key naming the query on each line: `text_id` or `image_id`.
    pub fn query_key(self) -> &'static str {
        match self {
            Direction::TextToImage => "text_id",
            Direction::ImageToText => "image_id",
        }
    }

    /// The key holding the ids (ground truth or ranked predictions): `image_ids` or `text_ids`.
    pub fn items_key(self) -> &'static str {
        match self {
            Direction::TextToImage => "image_ids",
            Direction::ImageToText => "text_ids",
        }
    }

    /// The Tianchi MUGE spelling of the same keys (`query_id` / `item_ids`, as in
    /// `MR_valid_queries.jsonl` and its submissions), accepted besides cn_clip's; text→image only.
    pub(crate) fn tianchi_keys(self) -> Option<(&'static str, &'static str)> {
        match self {
            Direction::TextToImage => Some(("query_id", "item_ids")),
            Direction::ImageToText => None,
        }
    }

    /// `Text_id` / `Image_id`, as cn_clip's messages start.
    pub(crate) fn query_title(self) -> &'static str {
        match self {
            Direction::TextToImage => "Text_id",
            Direction::ImageToText => "Image_id",
        }
    }

    /// `image_id` / `text_id`: one predicted item, in cn_clip's messages.
    pub(crate) fn item_key(self) -> &'static str {
        match self {
            Direction::TextToImage => "image_id",
            Direction::ImageToText => "text_id",
        }
    }

    /// `images` / `texts`, in cn_clip's duplicate message.
    pub(crate) fn items_noun(self) -> &'static str {
        match self {
            Direction::TextToImage => "images",
            Direction::ImageToText => "texts",
        }
    }
}
