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

variable "ssm_document_name" {
  description = "Name of the SSM Command document created from examples/iam/k3s-deploy-document.json: the action's ssm-document input, and the document named in the custom-document deploy role policy."
  type        = string
  default     = "k3s-deploy"

  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]{3,128}$", var.ssm_document_name)) && !can(regex("^(?i)(aws|amazon|amzn)", var.ssm_document_name))
    error_message = "ssm_document_name must be 3-128 letters, digits, _ . or -, and must not start with aws, amazon or amzn (reserved by AWS)."
  }
}

variable "deploy_target_tag_key" {
  description = "Tag key set to \"true\" on the master: the custom-document deploy role policy allows SendCommand only on instances with it (instance-tag-key k3s-deploy-target, instance-tag \"true\"). Protect the key from being edited (examples/iam/README.md). Empty: no such tag."
  type        = string
  default     = "k3s-deploy-target"
}
