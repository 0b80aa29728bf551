//! A batch of embedding vectors, stored flat and serialized as one CBOR byte
//! string of little-endian `f32`s.
//!
//! Why a byte string: CBOR encodes an array of floats as one tagged item per
//! float (5 bytes each, decoded one by one); a byte string is 4 bytes per
//! float and decodes as one copy. `cargo bench --bench bus -- cbor` measures
//! the difference (see README).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `rows` vectors of `dimension` floats each, row-major.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Vectors {
    dimension: usize,
    data: Vec<f32>,
}

/// A flat buffer that is not a whole number of rows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{len} floats is not a whole number of {dimension}-dimensional vectors")]
pub struct ShapeError {
    /// The dimension asked for.
    pub dimension: usize,
    /// Floats given.
    pub len: usize,
}

impl Vectors {
    /// Wraps a flat row-major buffer.
    ///
    /// # Errors
    /// [`ShapeError`] if `dimension` is zero or does not divide `data.len()`.
    pub fn new(dimension: usize, data: Vec<f32>) -> Result<Self, ShapeError> {
        if dimension == 0 || !data.len().is_multiple_of(dimension) {
            return Err(ShapeError {
                dimension,
                len: data.len(),
            });
        }
        Ok(Vectors { dimension, data })
    }

    /// The length of each vector.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// The number of vectors.
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.dimension).unwrap_or(0)
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Vector `i`.
    pub fn get(&self, i: usize) -> Option<&[f32]> {
        self.data.get(i * self.dimension..(i + 1) * self.dimension)
    }

    /// The vectors in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[f32]> {
        self.data.chunks_exact(self.dimension.max(1))
    }

    /// The flat buffer.
    pub fn as_flat(&self) -> &[f32] {
        &self.data
    }

    /// The flat buffer, by value.
    pub fn into_flat(self) -> Vec<f32> {
        self.data
    }
}

/// The wire form: `{dimension, data: bytes}`.
#[derive(Serialize, Deserialize)]
struct Wire<B> {
    dimension: u32,
    data: B,
}

impl Serialize for Vectors {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(self.data.len() * 4);
        for x in &self.data {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        Wire {
            dimension: self.dimension as u32,
            data: serde_bytes::ByteBuf::from(bytes),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Vectors {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = Wire::<serde_bytes::ByteBuf>::deserialize(deserializer)?;
        if wire.data.len() % 4 != 0 {
            return Err(serde::de::Error::custom(format!(
                "vector data of {} bytes is not a whole number of f32s",
                wire.data.len()
            )));
        }
        let data = wire
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Vectors::new(wire.dimension as usize, data).map_err(serde::de::Error::custom)
    }
}

/// Cosine similarity of two vectors of equal length (0 if either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_cbor_as_a_byte_string() {
        let v = Vectors::new(3, vec![1.0, -2.5, f32::MIN_POSITIVE, 0.0, 7.0, 1e-30]).unwrap();
        let mut bytes = Vec::new();
        ciborium::into_writer(&v, &mut bytes).unwrap();
        // 6 floats as a byte string: 24 payload bytes plus a 2-byte header.
        let value: ciborium::Value = ciborium::from_reader(bytes.as_slice()).unwrap();
        let map = value.as_map().unwrap();
        let data = map
            .iter()
            .find(|(k, _)| k.as_text() == Some("data"))
            .unwrap();
        assert_eq!(data.1.as_bytes().unwrap().len(), 24);
        let back: Vectors = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert_eq!(back, v);
        assert_eq!(back.len(), 2);
        assert_eq!(back.get(1).unwrap(), &[0.0, 7.0, 1e-30]);
    }

    #[test]
    fn rejects_ragged_data() {
        assert_eq!(
            Vectors::new(4, vec![0.0; 6]),
            Err(ShapeError {
                dimension: 4,
                len: 6
            })
        );
        assert!(Vectors::new(0, vec![]).is_err());
        let wire = Wire {
            dimension: 2,
            data: serde_bytes::ByteBuf::from(vec![0u8; 7]),
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&wire, &mut bytes).unwrap();
        let err = ciborium::from_reader::<Vectors, _>(bytes.as_slice()).unwrap_err();
        assert!(
            err.to_string().contains("not a whole number of f32s"),
            "{err}"
        );
    }
}
