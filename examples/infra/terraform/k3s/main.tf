# A single-node K3s master on EC2 for k3s-deploy-action: reachable only through SSM (no SSH, no
# public Kubernetes API), with the instance role, the tag and the tools the action relies on.

data "aws_partition" "current" {}

locals {
  # { k3s-deploy-target = "true" }, or no tag when the key is empty.
  deploy_target_tag = { for key in compact([var.deploy_target_tag_key]) : key => "true" }
}

# Amazon Linux 2023 ships the SSM agent, bash 5 and the AWS CLI v2: everything the deploy
# command lines and script need besides K3s itself.
data "aws_ami" "al2023" {
  most_recent = true
  owners      = ["amazon"]

  filter {
    name   = "name"
    values = ["al2023-ami-2023.*-x86_64"]
  }

  filter {
    name   = "architecture"
    values = ["x86_64"]
  }
}

# Instance role: the SSM agent's core permissions, and read access to the files the action stages.

data "aws_iam_policy_document" "ec2_assume_role" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "k3s_master" {
  name_prefix        = "k3s-master-"
  description        = "K3s master: SSM managed instance, reads k3s-deploy-* staging buckets"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume_role.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "ssm_core" {
  role       = aws_iam_role.k3s_master.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

# The same document as examples/iam/k3s-master-role-policy.json (one source for both): copy that
# file along when you copy this module.
resource "aws_iam_role_policy" "staged_files" {
  name   = "k3s-deploy-staged-files"
  role   = aws_iam_role.k3s_master.id
  policy = file("${path.module}/../../../iam/k3s-master-role-policy.json")
}

# The SSM Command document of the action's input `ssm-document`: a deploy role allowed this
# document only (examples/iam/deploy-role-policy-custom-document.json) can start the deploy and
# its rollback, and no other command. Its content is examples/iam/k3s-deploy-document.json,
# generated from the action's code (one source for both): copy that file along when you copy this
# module, and take the file of the same release as the action. The action refuses a document made
# for another release; an apply after an upgrade updates the document and makes the new version
# its default.
resource "aws_ssm_document" "k3s_deploy" {
  name            = var.ssm_document_name
  document_type   = "Command"
  document_format = "JSON"
  content         = file("${path.module}/../../../iam/k3s-deploy-document.json")
  tags            = var.tags
}

resource "aws_iam_instance_profile" "k3s_master" {
  name_prefix = "k3s-master-"
  role        = aws_iam_role.k3s_master.name
  tags        = var.tags
}

# Network: nothing comes in. SSM Run Command and Session Manager work over connections the agent
# opens, so neither SSH (22) nor the Kubernetes API (6443) is open to anyone.

resource "aws_security_group" "k3s_master" {
  name_prefix = "k3s-master-"
  description = "K3s master: no inbound rules; HTTPS out only"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-sg" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_egress_rule" "https" {
  security_group_id = aws_security_group.k3s_master.id
  description       = "HTTPS: SSM and S3 endpoints, the image registry, the K3s installer"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
  tags              = var.tags
}

resource "aws_instance" "k3s_master" {
  ami                         = data.aws_ami.al2023.id
  instance_type               = var.instance_type
  subnet_id                   = var.subnet_id
  vpc_security_group_ids      = [aws_security_group.k3s_master.id]
  iam_instance_profile        = aws_iam_instance_profile.k3s_master.name
  associate_public_ip_address = var.associate_public_ip_address
  ebs_optimized               = true
  monitoring                  = true

  user_data = templatefile("${path.module}/user_data.sh.tftpl", {
    k3s_version  = var.k3s_version
    swap_size_mb = var.swap_size_mb
  })

  # IMDSv2 only, and a hop limit of 1: the instance role's credentials are not reachable from
  # pods, whose traffic crosses one more network hop.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.root_volume_size_gb
    encrypted             = true
    delete_on_termination = true
  }

  # Name: the tag the action's default instance-tag-key looks for. The deploy target tag: the one
  # the custom-document policy's SendCommand condition needs (examples/iam/README.md).
  tags        = merge(var.tags, { Name = var.name }, local.deploy_target_tag)
  volume_tags = merge(var.tags, { Name = var.name })

  lifecycle {
    # A newer AMI or an edited boot script must not replace a running cluster (and its data) on
    # the next apply: replace the master deliberately (terraform apply -replace=...).
    ignore_changes = [ami, user_data]
  }
}
