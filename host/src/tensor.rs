//! Host tensor views: a borrowed slice of f32, f16 or bf16 with an explicit row-major shape.

use half::{bf16, f16};

/// Element type of the tensors (mixing weights, `r` and `gamma` are always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Lower-case name (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Parse a lower-case name.
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "f32" => Some(DType::F32),
            "f16" => Some(DType::F16),
            "bf16" => Some(DType::BF16),
            _ => None,
        }
    }
}

/// Borrowed input data.
#[derive(Clone, Copy, Debug)]
pub enum Data<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    BF16(&'a [bf16]),
}

/// Borrowed output data.
#[derive(Debug)]
pub enum DataMut<'a> {
    /// f32 elements.
    F32(&'a mut [f32]),
    /// f16 elements.
    F16(&'a mut [f16]),
    /// bf16 elements.
    BF16(&'a mut [bf16]),
}

macro_rules! conversions {
    ($t:ty, $v:ident) => {
        impl<'a> From<&'a [$t]> for Data<'a> {
            fn from(s: &'a [$t]) -> Self {
                Data::$v(s)
            }
        }
        impl<'a> From<&'a Vec<$t>> for Data<'a> {
            fn from(s: &'a Vec<$t>) -> Self {
                Data::$v(s)
            }
        }
        impl<'a> From<&'a mut [$t]> for DataMut<'a> {
            fn from(s: &'a mut [$t]) -> Self {
                DataMut::$v(s)
            }
        }
        impl<'a> From<&'a mut Vec<$t>> for DataMut<'a> {
            fn from(s: &'a mut Vec<$t>) -> Self {
                DataMut::$v(s)
            }
        }
    };
}
conversions!(f32, F32);
conversions!(f16, F16);
conversions!(bf16, BF16);

impl Data<'_> {
    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::F16(_) => DType::F16,
            Data::BF16(_) => DType::BF16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Data::F32(s) => s.len(),
            Data::F16(s) => s.len(),
            Data::BF16(s) => s.len(),
        }
    }

    /// Whether there is no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Data::F32(s) => s.to_vec(),
            Data::F16(s) => s.iter().map(|x| x.to_f32()).collect(),
            Data::BF16(s) => s.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// The raw bytes (little-endian, as stored).
    pub fn bytes(&self) -> &[u8] {
        match self {
            Data::F32(s) => bytemuck::cast_slice(s),
            Data::F16(s) => bytemuck::cast_slice(s),
            Data::BF16(s) => bytemuck::cast_slice(s),
        }
    }
}

impl DataMut<'_> {
    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            DataMut::F32(_) => DType::F32,
            DataMut::F16(_) => DType::F16,
            DataMut::BF16(_) => DType::BF16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            DataMut::F32(s) => s.len(),
            DataMut::F16(s) => s.len(),
            DataMut::BF16(s) => s.len(),
        }
    }

    /// Whether there is no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Write f32 values, rounding to the buffer's dtype. `src.len()` must equal `self.len()`.
    pub fn write_f32(&mut self, src: &[f32]) {
        assert_eq!(src.len(), self.len(), "write_f32: length");
        match self {
            DataMut::F32(d) => d.copy_from_slice(src),
            DataMut::F16(d) => d.iter_mut().zip(src).for_each(|(d, s)| *d = f16::from_f32(*s)),
            DataMut::BF16(d) => d.iter_mut().zip(src).for_each(|(d, s)| *d = bf16::from_f32(*s)),
        }
    }

    /// The raw bytes, for a device copy back.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            DataMut::F32(s) => bytemuck::cast_slice_mut(s),
            DataMut::F16(s) => bytemuck::cast_slice_mut(s),
            DataMut::BF16(s) => bytemuck::cast_slice_mut(s),
        }
    }
}

/// A borrowed input tensor with its shape (row-major, last axis contiguous).
#[derive(Clone, Debug)]
pub struct Tensor<'a> {
    /// The elements, row-major.
    pub data: Data<'a>,
    /// The shape (`[B, N, heads, d]` for attention inputs).
    pub shape: Vec<usize>,
}

impl<'a> Tensor<'a> {
    /// A view of `data` with a shape (checked against the data when validated).
    pub fn new(data: impl Into<Data<'a>>, shape: &[usize]) -> Self {
        Tensor { data: data.into(), shape: shape.to_vec() }
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }
}

/// A borrowed output tensor with its shape.
#[derive(Debug)]
pub struct TensorMut<'a> {
    /// The elements, row-major.
    pub data: DataMut<'a>,
    /// The shape.
    pub shape: Vec<usize>,
}

impl<'a> TensorMut<'a> {
    /// A mutable view of `data` with a shape (checked when validated).
    pub fn new(data: impl Into<DataMut<'a>>, shape: &[usize]) -> Self {
        TensorMut { data: data.into(), shape: shape.to_vec() }
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }
}
