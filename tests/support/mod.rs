pub mod local_kinesis;
pub mod proxy;
