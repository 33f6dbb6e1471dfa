variable "name" {
  description = "Name tag of the instance. The action finds the master by this tag: keep \"k3s-master\" in it, or change the action's instance-tag input and the deploy role's tag condition."
  type        = string
  default     = "k3s-master"
}

variable "instance_type" {
  description = "EC2 instance type. t3.micro (2 vCPU, 1 GiB) runs K3s and the example platform only with the swap file below; t3.small (2 GiB) is the comfortable minimum."
  type        = string
  default     = "t3.micro"
}

variable "vpc_id" {
  description = "VPC of the master."
  type        = string
}

variable "subnet_id" {
  description = "Subnet of the master: a private one whose route table reaches the internet through a NAT gateway (SSM, S3, the image registry and the K3s download are all HTTPS)."
  type        = string
}

variable "associate_public_ip_address" {
  description = "Give the master a public IP (only for a public subnet without NAT). Nothing listens on it: the security group admits no inbound traffic."
  type        = bool
  default     = false
}

variable "root_volume_size_gb" {
  description = "Size of the encrypted gp3 root volume, which holds K3s, the images and the local-path volumes (Redis)."
  type        = number
  default     = 20
}

variable "swap_size_mb" {
  description = "Swap file created at first boot, in MiB (0: none). A 1 GiB t3.micro needs it; with 2 GiB or more it is optional."
  type        = number
  default     = 1024

  validation {
    condition     = var.swap_size_mb >= 0 && var.swap_size_mb == floor(var.swap_size_mb)
    error_message = "swap_size_mb must be a whole number of MiB, 0 or more."
  }
}

variable "k3s_version" {
  description = "K3s release to install, e.g. \"v1.31.4+k3s1\". Empty: the newest release of the stable channel at first boot. Pin it for a reproducible master."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^(v[0-9]+\\.[0-9]+\\.[0-9]+\\+k3s[0-9]+)?$", var.k3s_version))
    error_message = "k3s_version must be empty or a release such as v1.31.4+k3s1."
  }
}

variable "tags" {
  description = "Tags for every resource that takes them."
  type        = map(string)
  default     = {}
}
